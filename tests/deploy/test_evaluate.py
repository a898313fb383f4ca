"""Evaluation: metric functions against hand-computed tables, then `refocus eval` end to end on the tiny model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from actors.env import ImageLimits
from actors.types import Target, Trajectory
from deploy.config import load_run_config
from deploy.evaluate import (
    ALL_TASKS,
    B_FIXED_BOX_MIOU,
    GREEDY,
    M_AP50,
    M_CATEGORY,
    M_DISTINCT,
    M_FORMAT,
    M_FOUND,
    M_MIOU,
    M_MIOU_FOUND,
    M_PRESENCE,
    M_PRESENCE_AUC,
    M_ROWS,
    M_SAMPLES,
    METRICS,
    MODES,
    SAMPLED,
    aggregate,
    average_precision,
    best_fixed_box,
    detection_scores,
    match_detections,
    mode_config,
    row_iou,
    score_sample,
)

LIMITS = ImageLimits(factor=28, min_pixels=56 * 56, max_pixels=224 * 224)


@pytest.fixture(scope="module")
def original_frame_config():
    """The run config with boxes written in original pixels, so expected values are plain arithmetic."""
    return load_run_config(None, ["rollout.prompt.frame=original", "rewards.frame.kind=original"])


def _completion(answer: dict | None) -> str:
    if answer is None:
        return "<think>hmm</think> I give up"  # no <answer> tag at all
    return f"<think>look</think><answer>{json.dumps(answer)}</answer>"


def _score(config, *, row_id, target, answer, sample_index=0, zoom_boxes=()):
    trajectory = Trajectory(sample_index=sample_index, prompt_ids=[1], completion_ids=[5, 6, 7],
                            behaviour_logprobs=[0.0] * 3, loss_mask=[1, 1, 1], completion_text=_completion(answer),
                            zoom_boxes=[list(b) for b in zoom_boxes])
    return score_sample(trajectory, row_id=row_id, task="camo", target=target, config=config, limits=LIMITS)


# --------------------------------------------------------------------------- metric functions


def test_presence_category_miou_and_distinct_answers_on_a_small_table(original_frame_config):
    moth = Target(present=True, category="moth", boxes=[[10, 10, 50, 50]], width=100, height=100)
    fish = Target(present=True, category="fish", boxes=[[0, 0, 40, 40]], width=100, height=100)
    empty = Target(present=False, category=None, boxes=[], width=100, height=100)
    leaf = Target(present=True, category="leaf insect", boxes=[[60, 60, 90, 90]], width=100, height=100)
    samples = [
        _score(original_frame_config, row_id="a", target=moth,
               answer={"present": True, "category": "Moths", "boxes": [[10, 10, 50, 50]]}),  # all right
        _score(original_frame_config, row_id="b", target=fish,  # wrong category, box shifted by half: IoU 1/3
               answer={"present": True, "category": "moth", "boxes": [[20, 0, 60, 40]]}),
        _score(original_frame_config, row_id="c", target=empty,
               answer={"present": False, "category": None, "boxes": []}),
        _score(original_frame_config, row_id="d", target=leaf, answer=None),  # no answer: wrong everywhere
    ]
    table = aggregate(samples)
    assert table[M_ROWS] == 4 and table[M_SAMPLES] == 4
    assert table[M_FORMAT] == pytest.approx(3 / 4)
    assert table[M_PRESENCE] == pytest.approx(3 / 4)
    assert table[M_CATEGORY] == pytest.approx(1 / 3)  # rows a, b, d have a category; only a is right
    assert table[M_MIOU] == pytest.approx((1 + 1 / 3 + 0) / 3)
    # Rows a and b give a box, d does not: found 2/3, and mIoU over a and b (1 + 1/3) / 2; their product is mIoU.
    assert table[M_FOUND] == pytest.approx(2 / 3)
    assert table[M_MIOU_FOUND] == pytest.approx(2 / 3)
    assert table[M_FOUND] * table[M_MIOU_FOUND] == pytest.approx(table[M_MIOU])
    # AP@0.5: 3 ground-truth boxes; detections a (TP, score 1) and b (IoU 1/3: FP, score 1) tie.
    assert table[M_AP50] == pytest.approx(1 / 3 * 1 / 2)
    assert table[M_DISTINCT] == 3
    assert set(table) == set(METRICS)


def test_a_none_answer_scores_no_iou_whatever_boxes_it_lists(original_frame_config):
    # The box alone would score IoU 1; a "none" verdict stands by no box, so the row's IoU is 0.
    moth = Target(present=True, category="moth", boxes=[[10, 10, 50, 50]], width=100, height=100)
    hedged = _score(original_frame_config, row_id="a", target=moth,
                    answer={"present": False, "category": None, "boxes": [[10, 10, 50, 50]]})
    assert hedged.iou == 0.0 and hedged.boxes == [] and hedged.presence == 0.0 and not hedged.strict
    table = aggregate([hedged])
    assert table[M_MIOU] == 0.0 and table[M_AP50] == 0.0
    assert table[M_FOUND] == 0.0 and table[M_MIOU_FOUND] is None  # no row gave a box
    # A box on an image without an animal finds nothing: found counts the rows with an animal only.
    empty = Target(present=False, category=None, boxes=[], width=100, height=100)
    false_alarm = _score(original_frame_config, row_id="b", target=empty,
                         answer={"present": True, "category": "moth", "boxes": [[10, 10, 50, 50]]})
    table = aggregate([hedged, false_alarm])
    assert table[M_FOUND] == 0.0 and table[M_MIOU_FOUND] is None


def test_a_none_answer_names_no_category_whatever_it_writes(original_frame_config):
    # "none, but if anything a moth": the category alone would be right; the verdict stands by none.
    moth = Target(present=True, category="moth", boxes=[[10, 10, 50, 50]], width=100, height=100)
    hedged = _score(original_frame_config, row_id="a", target=moth,
                    answer={"present": False, "category": "moth"})
    said = _score(original_frame_config, row_id="b", target=moth,
                  answer={"present": True, "category": "moth", "boxes": [[10, 10, 50, 50]]})
    assert hedged.category == 0.0 and said.category == 1.0 and not hedged.strict
    assert aggregate([hedged, said])[M_CATEGORY] == pytest.approx(1 / 2)
    # Naming a category beside "none" is not a different answer from "none" itself.
    plain = _score(original_frame_config, row_id="a", target=moth, answer={"present": False})
    assert hedged.key == plain.key
    # ... nor does the report's example sheet label it "moth".
    assert hedged.stated_category is None and said.stated_category == "moth"


def test_the_evaluation_reads_answers_under_the_think_rule_as_the_rewards_do(original_frame_config):
    """small-cpu's think_rule brief takes the answer from a completion that contradicts its think: RL gets
    nothing for it, and the evaluation counted it answered, strict and right."""
    brief = original_frame_config.model_copy(update={"rewards": original_frame_config.rewards.model_copy(
        update={"think_rule": "brief"})})
    moth = Target(present=True, category="moth", boxes=[[10, 10, 50, 50]], width=100, height=100)
    answer = {"present": True, "category": "moth", "boxes": [[10, 10, 50, 50]]}
    trajectory = Trajectory(sample_index=0, prompt_ids=[1], completion_ids=[5], behaviour_logprobs=[0.0],
                            loss_mask=[1], completion_text=f"<think>none</think><answer>{json.dumps(answer)}</answer>")
    contradicting = score_sample(trajectory, row_id="a", target=moth, task="camo", config=brief, limits=LIMITS)
    assert not contradicting.answered and not contradicting.strict and contradicting.iou == 0.0
    trajectory.completion_text = f"<think>present moth</think><answer>{json.dumps(answer)}</answer>"
    agreeing = score_sample(trajectory, row_id="a", target=moth, task="camo", config=brief, limits=LIMITS)
    assert agreeing.answered and agreeing.strict and agreeing.iou == 1.0


def test_a_huge_coordinate_is_clipped_not_an_overflow():
    # norm1000 on a 2000 px image scales boxes up by 2: a finite 1e308 becomes inf, which the answer key rounded.
    config = load_run_config(None, ["rollout.prompt.frame=norm1000", "rewards.frame.kind=norm1000"])
    wide = Target(present=True, category="moth", boxes=[[0, 0, 1000, 500]], width=2000, height=1000)
    scored = _score(config, row_id="a", target=wide, answer={"present": True, "category": "moth",
                                                              "boxes": [[0, 0, 1e308, 500]]})
    assert scored.boxes == [[0.0, 0.0, 2000.0, 500.0]] and scored.iou == pytest.approx(0.5)


def test_sampled_metrics_are_the_mean_over_sample_indices(original_frame_config):
    target = Target(present=True, category="moth", boxes=[[0, 0, 10, 10]], width=20, height=20)
    right = {"present": True, "category": "moth", "boxes": [[0, 0, 10, 10]]}
    wrong = {"present": False, "category": None, "boxes": []}
    samples = [_score(original_frame_config, row_id=r, target=target, answer=right if r == "x" or i == 0 else wrong,
                      sample_index=i) for r in ("x", "y") for i in range(2)]
    table = aggregate(samples)
    # Run 0: both rows right; run 1: x right, y wrong -> presence 1 and 1/2, mean 3/4; same for mIoU.
    assert table[M_PRESENCE] == pytest.approx(0.75) and table[M_MIOU] == pytest.approx(0.75)
    # Found: run 0 both rows, run 1 row x only -> 1 and 1/2, mean 3/4; every found box is exact: mIoU found 1.
    assert table[M_FOUND] == pytest.approx(0.75) and table[M_MIOU_FOUND] == pytest.approx(1.0)
    assert table[M_DISTINCT] == pytest.approx((1 + 2) / 2)
    assert table[M_ROWS] == 2 and table[M_SAMPLES] == 4


def test_presence_auc_ranks_rows_by_their_share_of_present_answers(original_frame_config):
    animal = Target(present=True, category="moth", boxes=[[0, 0, 10, 10]], width=20, height=20)
    empty = Target(present=False, category=None, boxes=[], width=20, height=20)
    yes = {"present": True, "category": "moth", "boxes": [[0, 0, 10, 10]]}
    no = {"present": False, "category": None, "boxes": []}
    said = {"a": (animal, [yes, yes]), "b": (animal, [yes, no]), "c": (empty, [no, yes]), "d": (empty, [no, None])}
    samples = [_score(original_frame_config, row_id=row, target=target, answer=answer, sample_index=i)
               for row, (target, answers) in said.items() for i, answer in enumerate(answers)]
    # Shares of "present": a 1, b 1/2 (animal); c 1/2, d 0 (none; no answer counts as not present).
    # Pairs (animal, none): 1>1/2, 1>0, 1/2=1/2 (half), 1/2>0 -> 3.5 / 4.
    assert aggregate(samples)[M_PRESENCE_AUC] == pytest.approx(0.875)
    # One sample per row (greedy): the balanced accuracy; run 1 alone: b says no, c says yes -> (1/2 + 1/2) / 2.
    assert aggregate([s for s in samples if s.sample_index == 1])[M_PRESENCE_AUC] == pytest.approx(0.5)
    assert aggregate([s for s in samples if s.row_id in "ab"])[M_PRESENCE_AUC] is None  # no row without an animal


def test_boxes_after_a_zoom_are_mapped_to_original_pixels(original_frame_config):
    """In the original frame a crop's boxes are crop pixels: [0, 0, 20, 20] in crop (40, 40, 80, 80) is
    [40, 40, 60, 60] in the image."""
    target = Target(present=True, category="moth", boxes=[[40, 40, 60, 60]], width=100, height=100)
    sample = _score(original_frame_config, row_id="z", target=target, zoom_boxes=[(40, 40, 80, 80)],
                    answer={"present": True, "category": "moth", "boxes": [[0, 0, 20, 20]]})
    assert sample.boxes == [[40.0, 40.0, 60.0, 60.0]] and sample.iou == pytest.approx(1.0) and sample.zooms == 1


def test_boxes_in_the_input_frame_are_mapped_to_original_pixels():
    """A 100 x 100 image is resized to 112 x 112 (smart_resize with 28 px cells): input [0, 0, 56, 56] is
    original [0, 0, 50, 50]."""
    config = load_run_config(None, ["rollout.prompt.frame=input", "rewards.frame.kind=input"])
    target = Target(present=True, category="moth", boxes=[[0, 0, 50, 50]], width=100, height=100)
    sample = _score(config, row_id="i", target=target, answer={"present": True, "category": "moth",
                                                               "boxes": [[0, 0, 56, 56]]})
    assert sample.boxes[0] == pytest.approx([0.0, 0.0, 50.0, 50.0]) and sample.iou == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ([], [[0, 0, 10, 10]], 0.0),  # no predicted box
        ([[50, 50, 60, 60], [0, 0, 10, 10]], [[0, 0, 10, 10]], 1.0),  # one object: the best box counts
        ([[0, 0, 10, 10]], [[0, 0, 10, 10], [20, 0, 30, 10]], 0.5),  # one box for two objects: (1 + 0) / 2
        ([[20, 0, 30, 10], [0, 0, 10, 5]], [[0, 0, 10, 10], [20, 0, 30, 10]], 0.75),  # pairs: IoU 1/2 and 1
        ([[0, 0, 10, 10], [0, 0, 10, 10]], [[0, 0, 10, 10], [20, 0, 30, 10]], 0.5),  # one box pairs only once
        ([[-10, -10, 10, 10]], [[0, 0, 10, 10]], 1.0),  # clipped into the image first
        ([[10, 10, 0, 0]], [[0, 0, 10, 10]], 1.0),  # corners reordered
    ],
)
def test_row_iou_with_several_boxes_and_none(pred, gt, expected):
    assert row_iou(pred, gt, width=100, height=100) == pytest.approx(expected)


def test_average_precision_on_a_hand_made_ranking():
    # Scores 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP with 3 objects: points (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2);
    # interpolated precision 1 up to recall 1/3, then 2/3 up to 2/3: AP = 1/3 + 1/3 * 2/3 = 5/9.
    ranking = [(0.9, True), (0.8, False), (0.7, True), (0.6, False)]
    assert average_precision(ranking, n_positives=3) == pytest.approx(5 / 9)
    assert average_precision(list(reversed(ranking)), n_positives=3) == pytest.approx(5 / 9)
    # Equal scores form one point whatever their order: precision 1/2 at recall 1.
    assert average_precision([(1.0, False), (1.0, True)], n_positives=1) == pytest.approx(0.5)
    assert average_precision([(1.0, True), (1.0, False)], n_positives=1) == pytest.approx(0.5)
    assert average_precision([], n_positives=2) == 0.0
    assert average_precision([(0.5, False)], n_positives=0) is None


def test_detections_rank_by_confidence_else_by_order():
    assert detection_scores(3, None) == pytest.approx([1.0, 0.5, 1 / 3])
    assert detection_scores(2, [0.2, 0.9]) == [0.2, 0.9]
    gt = [[0, 0, 10, 10]]
    # Both boxes cover the object: the more confident one takes it, the other is a duplicate (FP).
    assert match_detections([[0, 0, 10, 10], [0, 0, 10, 9]], gt, scores=[0.2, 0.9], width=20, height=20) == \
        [False, True]
    assert match_detections([[0, 0, 10, 10], [0, 0, 10, 9]], gt, scores=[1.0, 0.5], width=20, height=20) == \
        [True, False]
    # IoU exactly 0.5 counts.
    assert match_detections([[0, 0, 10, 5]], gt, scores=[1.0], width=20, height=20) == [True]


def test_best_fixed_box_on_three_boxes():
    rows = [([[0, 0, 50, 50]], 100, 100), ([[0, 0, 50, 50]], 100, 100), ([[50, 50, 100, 100]], 100, 100)]
    box, miou = best_fixed_box(rows)
    assert box == pytest.approx([0.0, 0.0, 0.5, 0.5]) and miou == pytest.approx(2 / 3)
    # Image-relative: the same object layout on a 200 px wide image is the same box.
    box, miou = best_fixed_box([([[0, 0, 50, 50]], 100, 100), ([[0, 0, 100, 50]], 200, 100)])
    assert box == pytest.approx([0.0, 0.0, 0.5, 0.5]) and miou == pytest.approx(1.0)
    # Off the lattice: coordinate ascent gets close to the exact box.
    box, miou = best_fixed_box([([[13, 27, 58, 91]], 100, 100)])
    assert miou > 0.97 and box == pytest.approx([0.13, 0.27, 0.58, 0.91], abs=0.01)
    assert best_fixed_box([]) == ([], 0.0)


def test_greedy_mode_is_temperature_zero_with_one_sample(original_frame_config):
    greedy = mode_config(original_frame_config.rollout, GREEDY)
    assert (greedy.sampling.temperature, greedy.sampling.n, greedy.sampling.top_p) == (0.0, 1, 1.0)
    assert mode_config(original_frame_config.rollout, SAMPLED) is original_frame_config.rollout
    with pytest.raises(ValueError, match="modes"):
        mode_config(original_frame_config.rollout, "beam")


def test_a_resumed_runs_replayed_steps_are_read_once(tmp_path):
    """Steps 1-5 logged, a crash, a resume from step 3's checkpoint logs 4-7 again: seven steps, the replay's."""
    from deploy.report import read_events

    lines = [{"step": s, "stage": 0, "reward_total": 0.1 * s} for s in range(1, 6)]
    lines += [{"step": s, "stage": 0, "reward_total": 1.0 + 0.1 * s} for s in range(4, 8)]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    events, bad = read_events(tmp_path / "events.jsonl")
    assert bad == 0 and [e["step"] for e in events] == list(range(1, 8))
    assert [e["reward_total"] for e in events[2:4]] == pytest.approx([0.3, 1.4])  # step 4 is the replay's


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, tmp_path_factory):
    """`refocus eval` of the random tiny model (HF engine) on 2 x 8 synthetic rows plus one corrupt row,
    with a run directory whose events.jsonl ends in a line cut mid-write."""
    from data.schema import read_rows, write_rows
    from data.synth import SplitSpec, synthesize
    from deploy.cli import main

    root = tmp_path_factory.mktemp("eval")
    splits = [SplitSpec(name="test_easy", fraction=0.5, hard_fraction=0.0),
              SplitSpec(name="test_hard", fraction=0.5, hard_fraction=1.0)]
    synthesize(out_dir=root / "data", seed=3, n=16, image_size=112, splits=splits)
    easy = read_rows(root / "data" / "test_easy.parquet")
    corrupt = {**easy[0], "id": "corrupt-0", "image": b"\x89PNG\r\n\x1a\n-truncated"}
    write_rows([corrupt, *easy], root / "data" / "test_easy.parquet")

    run = root / "run"
    run.mkdir()
    events = [{"step": s, "stage": s // 3, "reward_total": 0.1 * s,
               "rewards": {"total": 0.1 * s, "format": 0.05 * s, "presence": 0.5}} for s in range(1, 7)]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"step": 7, "sta')

    out = root / "out"
    tiny_cpu = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "tiny-cpu.yaml"
    code = main(["eval", str(tiny_model_dir), "--data", str(root / "data"), "--run-dir", str(run), "--out", str(out),
                 "--config", str(tiny_cpu), "--limit", "6", "--set", "rollout.engine.backend=hf", "--set", "rollout.engine.cpu_threads=1",
                 "--set", "rollout.sampling.max_tokens=24"])
    assert code == 0
    return out, root


def test_eval_writes_every_metric_for_both_splits_and_modes(eval_run, capsys):
    out, _ = eval_run
    result = json.loads((out / "eval.json").read_text())
    assert set(result["splits"]) == {"test_easy", "test_hard"}
    assert result["splits"]["test_easy"]["bad_rows"] == {"image": 1}  # counted and skipped
    for split, entry in result["splits"].items():
        assert entry["rows"] == 6
        assert entry["baseline"][ALL_TASKS][B_FIXED_BOX_MIOU] > 0.1  # synthetic objects sit near the centre
        assert set(entry["modes"]) == set(MODES)
        for mode, tables in entry["modes"].items():
            table = tables[ALL_TASKS]
            assert set(table) == set(METRICS), (split, mode)
            assert table[M_ROWS] == 6 and table[M_SAMPLES] == (6 if mode == GREEDY else 6 * 4)
            # A random-weights model does not write the grammar, so it answers (almost) nothing.
            assert table[M_FORMAT] <= 0.1
            assert table[M_DISTINCT] is not None and table[M_DISTINCT] >= 0
            assert tables["by_task"]["camo"] == table  # one task: the same samples
        assert [e["id"] for e in entry["examples"]] == [f"synth-3-{split}-{i:06d}" for i in range(6)]


def test_eval_writes_a_report_with_pictures_that_decode(eval_run):
    from PIL import Image

    out, _ = eval_run
    report = (out / "report.md").read_text()
    for name in ("curves.png", "examples_test_easy.png", "examples_test_hard.png"):
        assert f"]({name})" in report
        with Image.open(out / name) as image:
            image.load()
            assert image.width >= 400 and image.height >= 200, name
    with Image.open(out / "examples_test_easy.png") as image:
        assert image.size == (4 * 224, 2 * (224 + 2 * 12))  # 6 examples in rows of 4, two label lines
    assert "fixed-box mIoU" in report and "distinct answers" in report
    assert "6 learner steps" in report and "1 unreadable event lines skipped" in report
    assert "Skipped in test_easy: corrupt rows by field {'image': 1}." in report


def test_report_draws_predicted_boxes_in_magenta(eval_run):
    """The random model answers nothing, so give one example an answer and redraw the report."""
    from PIL import Image

    from deploy.report import write_report

    out, root = eval_run
    result = json.loads((out / "eval.json").read_text())
    example = result["splits"]["test_hard"]["examples"][0]
    example.update(answered=True, present=True, category="moth", boxes=[[10.0, 10.0, 50.0, 50.0]])
    files = write_report(result=result, out_dir=root / "redrawn")
    assert files.curves is None and set(files.examples) == {"test_easy", "test_hard"}
    with Image.open(files.examples["test_hard"]) as image:
        sheet = image.convert("RGB")
    # 112 px images in 224 px tiles: the box's left edge is at x = 20, from y = 20 to 99.
    assert sheet.getpixel((20, 60)) == (255, 0, 255)
    assert sheet.getpixel((224 + 20, 60)) != (255, 0, 255)  # the second example has no answer


def test_the_example_sheet_draws_the_rows_the_evaluation_read(tmp_path):
    """A second row under an example's id (refused as a duplicate by the loader, counted in bad_rows) gets no
    tile of its own: the sheet draws the rows the evaluation scored, once each, in the examples' order."""
    from PIL import Image

    from data.contact_sheet import BACKGROUND, GT_COLOUR
    from data.schema import read_rows, write_rows
    from data.synth import synthesize
    from deploy.report import _example_sheets

    synthesize(out_dir=tmp_path / "synth", seed=5, n=20)
    rows = read_rows(tmp_path / "synth" / "test_easy.parquet")[:2]
    duplicate = {**rows[0], "image": rows[1]["image"]}  # the same id, another image
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_rows([rows[0], duplicate, rows[1]], data_dir / "test_easy.parquet")
    examples = [{"id": r["id"], "answered": False} for r in (rows[1], rows[0])]
    result = {"data_dir": str(data_dir), "splits": {"test_easy": {"examples": examples}}}
    (tmp_path / "out").mkdir()
    sheets = _example_sheets(result, tmp_path / "out")
    with Image.open(sheets["test_easy"]) as sheet:
        sheet = sheet.convert("RGB")
    assert sheet.getpixel((2 * 224 + 10, 10)) == BACKGROUND  # two tiles, not three
    with Image.open(io.BytesIO(rows[1]["image"])) as first_example:  # drawn first, as the examples list it
        expected = first_example.convert("RGB").resize((224, 224), Image.Resampling.NEAREST)
    tile = sheet.crop((0, 0, 224, 224)).getdata()
    assert all(got in (want, GT_COLOUR) for got, want in zip(tile, expected.getdata()))  # boxes drawn over it
