"""Loading a training split: bad rows are counted by field and skipped; mostly-bad sets fail fast."""

import io

import numpy as np
import pytest
from PIL import Image

from data.schema import write_rows
from deploy.training_data import BadDatasetError, load_training_data, mirrored


def _png(size=32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _row(i: int, **change) -> dict:
    row = dict(id=f"r{i}", image=_png(), width=32, height=32, task="camo", question="Is there an animal?",
               category="moth", boxes=[[2.0, 3.0, 20.0, 30.0]], present=True, split="train", difficulty="easy")
    row.update(change)
    return row


def test_bad_rows_are_counted_by_field_and_skipped(tmp_path):
    rows = [_row(i) for i in range(8)]
    rows.append(_row(8, image=b"\x89PNG\r\n\x1a\n-truncated"))  # corrupt image
    rows.append(_row(9, boxes=[[5.0, 5.0, 5.0, 9.0]]))  # zero-area box
    rows.append(_row(10, task="segment"))  # unknown task
    rows.append(_row(11, boxes=[[-4.0, 2.0, 40.0, 31.5]]))  # overhangs: clamped, kept
    write_rows(rows, tmp_path / "train.parquet")
    data = load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.5)
    assert len(data.rows) == 9
    assert sum(data.bad_rows.values()) == 3
    assert set(data.bad_rows) == {"image", "boxes", "task"}
    assert data.rows["r11"]["boxes"] == [[0.0, 2.0, 32.0, 31.5]]
    group = data.prompt_group("r3", issue=7, stage=1)
    assert group.group_id == "r3#7" and group.target.boxes == [[2.0, 3.0, 20.0, 30.0]] and group.stage == 1


def test_a_mostly_bad_set_fails_fast_with_the_counts(tmp_path):
    rows = [_row(0)] + [_row(i, image=b"junk") for i in range(1, 5)]
    write_rows(rows, tmp_path / "train.parquet")
    with pytest.raises(BadDatasetError, match=r"4 of 5 rows.*'image': 4"):
        load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.5)


def test_train_difficulty_keeps_only_its_rows_before_the_limit_counts_them(tmp_path):
    rows = [_row(i, difficulty="easy" if i % 3 else "hard") for i in range(9)]  # hard: r0, r3, r6
    rows.insert(1, _row(99, difficulty="hard", image=b"junk"))  # a bad row is counted whatever its difficulty
    write_rows(rows, tmp_path / "train.parquet")
    data = load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.5, limit=2, difficulty="hard")
    assert list(data.rows) == ["r0", "r3"]
    assert data.bad_rows == {"image": 1}
    easy = load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.5, difficulty="easy")
    assert list(easy.rows) == ["r1", "r2", "r4", "r5", "r7", "r8"]
    write_rows([_row(0)], tmp_path / "easy_only.parquet")
    with pytest.raises(BadDatasetError, match="no usable rows of difficulty 'hard'"):
        load_training_data(tmp_path / "easy_only.parquet", max_bad_fraction=0.5, difficulty="hard")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Parquet file"):
        load_training_data(tmp_path / "nope.parquet", max_bad_fraction=0.5)


def test_rl_mirror_flips_odd_issues_image_and_boxes_alike(tmp_path):
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[3:30, 2:20] = 255  # the animal: x 2..20, y 3..30, as the row's box says
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    write_rows([_row(0, image=buf.getvalue())], tmp_path / "train.parquet")
    data = load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.5)
    data.mirror = True

    plain, flipped = data.prompt_group("r0", issue=2, stage=0), data.prompt_group("r0", issue=3, stage=0)
    assert plain.image == data.rows["r0"]["image"] and plain.target.boxes == [[2.0, 3.0, 20.0, 30.0]]
    assert flipped.target.boxes == [[12.0, 3.0, 30.0, 30.0]]  # x -> 32 - x
    shown = np.asarray(Image.open(io.BytesIO(flipped.image)))
    assert shown[3:30, 12:30].min() == 255 and shown[:, :12].max() == 0 and shown[:, 30:].max() == 0
    assert flipped.prompt_id == "r0" and flipped.target.width == 32


def test_mirrored_leaves_undecodable_bytes_to_the_rollout():
    junk = b"\x89PNG-truncated"
    assert mirrored(junk, [[1.0, 2.0, 3.0, 4.0]], width=10) == (junk, [[1.0, 2.0, 3.0, 4.0]])


def test_a_synthetic_set_made_with_another_seed_is_used_as_it_is_and_said_so(tmp_path, caplog):
    from data.synth import SYNTH_CONFIG_FILE, synthesize
    from deploy.config import DataConfig
    from deploy.training_data import prepare_training_data

    synthesize(out_dir=tmp_path, seed=0, n=20)
    assert '"seed": 0' in (tmp_path / SYNTH_CONFIG_FILE).read_text()
    made = (tmp_path / "train.parquet").read_bytes()
    with caplog.at_level("WARNING"):
        data = prepare_training_data(DataConfig(path=str(tmp_path), synth_seed=0, synth_n=20))
    assert "holds a synthetic set" not in caplog.text and len(data.rows) == 16
    with caplog.at_level("WARNING"):
        prepare_training_data(DataConfig(path=str(tmp_path), synth_seed=1, synth_n=20))
    assert "holds a synthetic set of seed 0 and 20 images, not data.synth_seed=1" in caplog.text
    assert (tmp_path / "train.parquet").read_bytes() == made  # not regenerated
