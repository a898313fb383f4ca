"""models.average: the uniform mean of checkpoints' weights, written as a plain model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.average import AVERAGED_FROM_FILE, average_checkpoints


def checkpoint(root: Path, name: str, weights: dict[str, torch.Tensor], *, config: str) -> Path:
    path = root / name
    (path / "state").mkdir(parents=True)
    save_file(weights, path / "model.safetensors")
    (path / "config.json").write_text(config)
    (path / "COMPLETE").write_text("ok")
    (path / "trainer_state.json").write_text("{}")
    return path


def test_the_average_is_the_mean_of_float_tensors_in_their_dtype_with_the_last_configs(tmp_path):
    steps = torch.arange(3, dtype=torch.int64)
    a = checkpoint(tmp_path, "a", {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5], dtype=torch.bfloat16),
                                   "steps": steps}, config="first")
    b = checkpoint(tmp_path, "b", {"w": torch.tensor([2.0, 4.0]), "h": torch.tensor([1.0], dtype=torch.bfloat16),
                                   "steps": steps}, config="second")
    c = checkpoint(tmp_path, "c", {"w": torch.tensor([6.0, 0.0]), "h": torch.tensor([3.0], dtype=torch.bfloat16),
                                   "steps": steps}, config="third")
    out = average_checkpoints([a, b, c], tmp_path / "avg")
    weights = load_file(out / "model.safetensors")
    assert weights["w"].tolist() == [3.0, 2.0]  # (1 + 2 + 6) / 3, (2 + 4 + 0) / 3
    assert weights["h"].dtype == torch.bfloat16 and weights["h"].item() == 1.5  # (0.5 + 1 + 3) / 3
    assert torch.equal(weights["steps"], steps)
    assert (out / "config.json").read_text() == "third"
    # A plain model directory: no resumable learner state that would pass for one of the run's checkpoints.
    assert sorted(p.name for p in out.iterdir()) == [AVERAGED_FROM_FILE, "config.json", "model.safetensors"]
    assert json.loads((out / AVERAGED_FROM_FILE).read_text()) == [str(a), str(b), str(c)]


def test_an_average_carries_no_record_of_its_sources_but_its_own_written_after_the_weights(tmp_path, monkeypatch):
    import safetensors.torch

    a = checkpoint(tmp_path, "a", {"w": torch.zeros(2)}, config="")
    b = checkpoint(tmp_path, "b", {"w": torch.ones(2)}, config="")
    (b / AVERAGED_FROM_FILE).write_text('["an SFT average b was trained from"]')
    (b / "refocus_build.json").write_text("{}")
    out = average_checkpoints([a, b], tmp_path / "avg")
    assert json.loads((out / AVERAGED_FROM_FILE).read_text()) == [str(a), str(b)]
    assert not (out / "refocus_build.json").exists()

    def killed(*args, **kwargs):  # the process dies while writing the weights of a second average here
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        average_checkpoints([b, a], out)
    assert not (out / AVERAGED_FROM_FILE).exists()  # so bench.checkpoint_curve does not take it for complete


def test_checkpoints_that_do_not_match_are_refused(tmp_path):
    a = checkpoint(tmp_path, "a", {"w": torch.zeros(2), "n": torch.tensor([1])}, config="")
    other_name = checkpoint(tmp_path, "b", {"v": torch.zeros(2), "n": torch.tensor([1])}, config="")
    other_shape = checkpoint(tmp_path, "c", {"w": torch.zeros(3), "n": torch.tensor([1])}, config="")
    other_int = checkpoint(tmp_path, "d", {"w": torch.zeros(2), "n": torch.tensor([2])}, config="")
    with pytest.raises(ValueError, match="tensor names differ"):
        average_checkpoints([a, other_name], tmp_path / "out")
    with pytest.raises(ValueError, match=r"w has shape \(3,\)"):
        average_checkpoints([a, other_shape], tmp_path / "out")
    with pytest.raises(ValueError, match="non-float tensor n differs"):
        average_checkpoints([a, other_int], tmp_path / "out")
    # The same values in another dtype: an int64 among floats was compared with the running sum, found
    # equal and left out of it, and the sum still divided by all directories (0.5 for a mean of 1).
    float_w = checkpoint(tmp_path, "e", {"w": torch.ones(2), "n": torch.tensor([1])}, config="")
    int_w = checkpoint(tmp_path, "f", {"w": torch.ones(2, dtype=torch.int64), "n": torch.tensor([1])}, config="")
    bf16_w = checkpoint(tmp_path, "g", {"w": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor([1])}, config="")
    for other in (int_w, bf16_w):
        with pytest.raises(ValueError, match="w is torch"):
            average_checkpoints([float_w, other], tmp_path / "out")
    with pytest.raises(ValueError, match="missing"):
        average_checkpoints([tmp_path / "nowhere"], tmp_path / "out")


def test_the_average_of_a_model_with_itself_loads_in_transformers_and_answers_alike(tiny_model_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = average_checkpoints([tiny_model_dir, tiny_model_dir], tmp_path / "avg")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        original = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
        averaged = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()(input_ids=ids).logits
    torch.testing.assert_close(averaged, original)
