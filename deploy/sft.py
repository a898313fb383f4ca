"""Supervised warm start (``refocus sft``): cross-entropy on target answers, on the RL learner's backend.

Each training row becomes one sequence exactly as the rollout would show it to the model: the prompt
token ids come from the rollout's own ``ZoomEnv.reset`` (same chat template, system message, image
pads and coordinate frame), the completion is ``data.prompts.target_completion`` (brief or refocus
think, then the exact answer) followed by the end-of-turn token, and only the completion tokens are
trained on. The learner is the same ``LearnerGroup`` of ZeRO-3 ranks the RL loop uses, so checkpoints
have the same format and RL starts from SFT's model as from any model directory.

A run goes through the training rows in shuffled epochs; with ``easy_first`` the first epoch shows
the easy rows before the hard ones. ``max_seconds`` stops early on wall time: the "SFT control" of
the learning benchmark continues SFT from a checkpoint for as long as RL trained.

At a constant lr one step's weights are a draw from a wide scatter (issue #9: held-out hard mIoU 0.41-0.46 between
checkpoints 25 steps apart). With ``average_last: K`` the run keeps weight snapshots every ``average_every`` steps
(the last K, plain model directories) and ends with their uniform average (``models.average``): the model RL starts
from and the one evaluated as "SFT". The last checkpoint, with its optimiser state, stays what a control continues.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploy.run_record import LEARNER_PLACEMENT, refuse_other_settings, trim_events

log = logging.getLogger(__name__)

SFT_EVENTS_FILE = "sft_events.jsonl"  # one JSON object per SFT step
SFT_SUMMARY_FILE = "sft_summary.json"
SNAPSHOT_DIR = "snapshots"  # <out>/snapshots/step_N: the weights average_last averages (the last K are kept)
AVERAGE_DIR = "average"  # <out>/average: their weight average, a plain model directory
SFT_STEP_KEY = "sft_step"  # the SFT step a learner checkpoint was written at, in its extra_state
SFT_SETTINGS_FILE = "sft_settings.json"  # what determines the run's weights (``sft_settings``)
INIT_FROM_FILE = "init_from.json"  # a continuation's start (``--init-from``), for a resume before its first checkpoint

# Fields left out of ``sft_settings``. Those that do not change what an SFT trains, so a resume or a finished run's
# reuse may differ in them: how long it runs (a resume may extend it; a finished run is matched on its steps), how
# it reports, where it runs, and the data's and learner's fields for RL alone. And the learner fields SFT sets
# from its own section (``sft_learner_config``), recorded there once; the tower's settings are recorded as applied.
_LEFT_OUT = {
    "sft": {"steps", "max_seconds", "checkpoint_every", "log_every", "num_cpus_per_rank", "freeze_vision",
            "vision_lr_scale"},
    "data": {"synth", "rl_mirror", "eval_splits", "max_bad_fraction"},
    "learner": LEARNER_PLACEMENT | {
        "eps_low", "eps_high", "aggregation", "advantage_scale", "advantage_eps", "temperature",  # RL's alone
        "encode_images_once_per_group",
        "model_path", "global_batch_samples", "micro_batch_samples", "lr", "warmup_steps", "schedule",  # SFT sets
        "max_steps", "weight_decay", "kl_coef", "old_logprobs"},
}


class SFTConfig(BaseModel):
    """The supervised warm start of a run (``RunConfig.sft``; absent: RL starts from ``model.path``)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(300, ge=1, description="optimiser steps (each on batch_samples rows)")
    batch_samples: int = Field(32, ge=1, description="rows per optimiser step, all ranks together")
    micro_batch_samples: int = Field(16, ge=1, description="rows per forward/backward on one rank")
    lr: float = Field(5e-4, gt=0.0, le=1.0, description="AdamW lr after warm-up (constant: a control can continue it)")
    warmup_steps: int = Field(20, ge=0, description="steps of linear lr warm-up")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW decoupled weight decay")
    think: Literal["brief", "refocus"] = Field(
        "brief", description="target think: brief (verdict, then category: 'present moth' or 'none') or "
        "refocus (overview, focus boxes, summary)")
    zoom_context: float | None = Field(
        None, ge=1.0, le=4.0, description="Chain-of-Focus traces: a row with boxes is taught as two turns, a zoom "
        "onto the square region this many times the boxes' longer side (actors.env.zoom_region), then the answer "
        "about the crop; rows without boxes answer at once (None: one turn; needs rollout.env.max_turns >= 2)")
    zoom_jitter: float = Field(
        0.0, ge=0.0, le=1.0, description="vary the zoom traces' regions: context drawn from [zoom_context, "
        "zoom_context * (1 + jitter)], the region moved off-centre by up to jitter times the room the boxes leave "
        "(0: every crop shows the animal centred at one size, which the answer turn learns instead of looking)")
    zoom_names_after: bool = Field(
        False, description="zoom traces think only 'present' before the zoom and name the animal in the answer "
        "turn, from the crop (the tower tells the animals apart on a zoom, not on the whole image: "
        "bench.category_probe); False: both turns think 'present <category>'")
    easy_first: bool = Field(True, description="first epoch: easy rows before hard ones")
    max_seconds: float | None = Field(
        None, gt=0.0, description="stop once the run has trained this long, the seconds before a resume included "
        "(a run started from another run's checkpoint counts from 0); None: run all steps")
    checkpoint_every: int = Field(
        0, ge=0, description="also checkpoint every N steps (0: only at the end); a run's later checkpoints show "
        "how far one is from the next (bench.checkpoint_curve)")
    average_last: int = Field(
        0, ge=0, description="end with the uniform weight average of the last K snapshots, taken every "
        "average_every steps and at the last step, as the run's model (0: the last step's weights)")
    average_every: int = Field(25, ge=1, description="steps between the snapshots average_last averages")
    num_cpus_per_rank: float | None = Field(
        None, gt=0.0, le=1024,
        description="CPUs each learner rank reserves during SFT (None: learner.num_cpus_per_rank); nothing else "
        "runs beside SFT, and torch takes as many threads as the rank reserves")
    freeze_vision: bool | None = Field(
        None, description="keep the vision tower fixed during SFT (None: learner.freeze_vision, as RL)")
    vision_lr_scale: float | None = Field(
        None, gt=0.0, le=1.0, description="the tower's lr as a fraction of SFT's lr (None: learner.vision_lr_scale)")
    log_every: int = Field(10, ge=1, description="steps between progress lines")
    seed: int = Field(0, ge=0, description="shuffling seed")

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.batch_samples % self.micro_batch_samples:
            raise ValueError(f"batch_samples ({self.batch_samples}) must be divisible by micro_batch_samples "
                             f"({self.micro_batch_samples})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps})")
        if self.zoom_context is not None and self.think != "brief":
            raise ValueError("zoom_context: zoom traces use the brief think (set think: brief)")
        if self.zoom_names_after and self.zoom_context is None:
            raise ValueError("zoom_names_after: names the animal after a zoom; set zoom_context (zoom traces)")
        if (self.average_last - 1) * self.average_every >= self.steps:
            raise ValueError(f"average_last ({self.average_last}) snapshots every average_every ({self.average_every}) "
                             f"steps reach back before step 1 of {self.steps}")
        return self


@dataclass
class SFTSummary:
    steps: int
    checkpoint: str  # the last checkpoint (weights and optimiser state): what a resume or a control continues
    model: str  # the model the run produced, for RL and evaluation: the weight average, else the last checkpoint
    wall_s: float  # seconds this run trained, those before a resume included
    nll: float | None  # the mean of the last log_every steps' NLL per answer token (None: this run made no step)
    rows: int  # training rows available
    events_path: str
    averaged_steps: list[int]  # the snapshots ``model`` averages ([]: average_last is 0)


def sft_learner_config(learner, sft: SFTConfig, *, model_path: str):
    """The run's learner config with SFT's batch geometry and optimiser (same backend, ranks, ZeRO stage)."""
    return learner.model_copy(update=dict(
        model_path=model_path, global_batch_samples=sft.batch_samples, micro_batch_samples=sft.micro_batch_samples,
        lr=sft.lr, warmup_steps=sft.warmup_steps, schedule="constant", max_steps=max(sft.steps, sft.warmup_steps, 1),
        weight_decay=sft.weight_decay, kl_coef=0.0, old_logprobs="behaviour",
        num_cpus_per_rank=sft.num_cpus_per_rank or learner.num_cpus_per_rank,
        freeze_vision=learner.freeze_vision if sft.freeze_vision is None else sft.freeze_vision,
        vision_lr_scale=sft.vision_lr_scale or learner.vision_lr_scale,
        cpu_cores=None,  # learner.cpu_cores keeps RL's learner off the rollout engines' cores; SFT runs alone
    ))


def sft_settings(config, *, model_path: str) -> dict:
    """What determines the weights an SFT of ``config`` trains from ``model_path``: the model, the training rows,
    how they are prompted and turned into targets, and the optimiser; nested dicts of JSON values, paths resolved."""
    learner = sft_learner_config(config.learner, config.sft, model_path=model_path)
    data = config.data.model_dump(mode="json", exclude=_LEFT_OUT["data"])
    data["path"] = str(Path(data["path"]).resolve())
    return {"model": str(Path(model_path).resolve()), "data": data,
            # sampling.max_tokens: rows whose answer is longer are left out (SupervisedBatches)
            "rollout": config.rollout.model_dump(mode="json", include={"prompt": True, "env": True,
                                                                        "sampling": {"max_tokens"}}),
            "sft": config.sft.model_dump(mode="json", exclude=_LEFT_OUT["sft"]),
            "learner": learner.model_dump(mode="json", exclude=_LEFT_OUT["learner"])}


def check_same_settings(out_dir: Path, settings: dict, *, setting: str) -> None:
    """Refuse to continue or reuse the SFT in ``out_dir`` when it was trained with other ``settings`` (``setting``:
    what names that directory, for the message). Runs from before the settings were recorded are not checked."""
    recorded_file = out_dir / SFT_SETTINGS_FILE
    if recorded_file.is_file():
        refuse_other_settings(json.loads(recorded_file.read_text()), settings, directory=out_dir, setting=setting,
                              what="an SFT")


def row_order(rows: dict[str, dict], *, seed: int, easy_first: bool) -> Iterator[str]:
    """Row ids forever, epoch after epoch, each epoch shuffled; the first epoch easy before hard."""
    rng = random.Random(seed)
    ids = sorted(rows)
    epoch = 0
    while True:
        order = list(ids)
        rng.shuffle(order)
        if easy_first and epoch == 0:
            order.sort(key=lambda i: rows[i]["difficulty"] != "easy")  # stable: shuffled within each level
        yield from order
        epoch += 1


class SupervisedBatches:
    """Training rows → ``TrajectoryGroup``s of one target trajectory each (what ``collate`` takes).

    Targets are assembled by the rollout's own ``TrajectoryBuilder`` with the model turns teacher-forced.
    With ``zoom_context`` a row with boxes becomes a Chain-of-Focus trace, its crop served by the rollout's
    own environment, so the tokens are those a rollout would produce::

        <think>present moth</think><zoom>[region]</zoom> | env: crop shown back | <think>present moth</think><answer>
                                                           (loss_mask 0)          {boxes in the crop's frame}</answer>
    """

    def __init__(self, *, data, rollout_config, processor, think: str, zoom_context: float | None = None,
                 zoom_jitter: float = 0.0, zoom_names_after: bool = False):
        from actors.env import ZoomEnv

        if zoom_context is not None and rollout_config.env.max_turns < 2:
            raise ValueError("sft.zoom_context needs rollout.env.max_turns >= 2 (the rollout must serve the zoom)")
        # data.rl_mirror is RL's alone: the targets below are built from the rows as stored
        self.data = dataclasses.replace(data, mirror=False)
        self.env = ZoomEnv(config=rollout_config.env, prompt=rollout_config.prompt, processor=processor)
        self.frame = rollout_config.prompt.frame
        self.tokenizer = processor.tokenizer
        self.end_ids = self.tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
        self.think = think
        self.zoom_context = zoom_context
        self.zoom_jitter = zoom_jitter
        self.zoom_names_after = zoom_names_after
        self.left_out = self._leave_out_over_long(min(rollout_config.sampling.max_tokens,
                                                      rollout_config.env.max_completion_tokens))

    def _leave_out_over_long(self, limit: int) -> int:
        """Leave out of ``self.data`` the rows whose answer is longer than ``limit`` tokens, the most the rollout lets
        the model write in a turn: taught them, it would learn answers that RL and the evaluation cut short (a
        COD10K image with many mask components under a 64-token budget). The answer is measured as one turn
        writes it; a zoom trace's answer turn writes the same boxes in the crop's frame. Returns how many."""
        from data.prompts import target_completion

        def length(row: dict) -> int:
            size = self.env.limits.input_size(row["width"], row["height"])
            text = target_completion(row, frame=self.frame, think=self.think, input_size=size)
            return len(self._encode(text)) + len(self.end_ids)

        too_long = {row_id: n for row_id, row in self.data.rows.items() if (n := length(row)) > limit}
        if too_long:
            if len(too_long) == len(self.data.rows):
                raise ValueError(f"every SFT row's answer is longer than the rollout's limit of {limit} tokens "
                                 f"(rollout.sampling.max_tokens / rollout.env.max_completion_tokens); raise it")
            longest = max(too_long, key=too_long.get)
            log.warning("SFT leaves out %d of %d rows whose answer is longer than the %d tokens the rollout may write "
                        "(the longest: %r, %d tokens)", len(too_long), len(self.data.rows), limit, longest,
                        too_long[longest])
            self.data = dataclasses.replace(
                self.data, rows={k: v for k, v in self.data.rows.items() if k not in too_long})
        return len(too_long)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _model_turn(self, text: str, *, ends_turn: bool):
        """``text`` as the model's turn (teacher forcing: no behaviour log-probs in SFT)."""
        from actors.engines.base import FINISH_STOP, EngineSample

        ids = self._encode(text) + (self.end_ids if ends_turn else [])
        return EngineSample(token_ids=ids, logprobs=[0.0] * len(ids), text=text, finish_reason=FINISH_STOP)

    def group(self, row_id: str, *, issue: int):
        from actors.rollout import TrajectoryBuilder
        from actors.types import TrajectoryGroup
        from data.prompts import target_completion

        prompt = self.data.prompt_group(row_id, issue=issue, stage=0)
        prompt_ids, episode = self.env.reset(prompt)
        row = self.data.rows[row_id]
        built = TrajectoryBuilder(prompt_ids=prompt_ids, episode=episode)
        seen_size = self.env.limits.input_size(row["width"], row["height"])
        if self.zoom_context is not None and row["boxes"]:
            row, seen_size = self._zoom_turn(built, row, issue=issue)
        text = target_completion(row, frame=self.frame, think=self.think, input_size=seen_size)
        built.add_model_turn(self._model_turn(text, ends_turn=True))
        return TrajectoryGroup(prompt=prompt, trajectories=[built.trajectory(0)], policy_version=0, worker_id="sft")

    def _zoom_turn(self, built, row: dict, *, issue: int) -> tuple[dict, tuple[int, int]]:
        """Teach a zoom onto the row's boxes and show the crop as the rollout would; returns the row as the
        crop shows it (size and boxes relative to the crop) and the crop's shown size, for the answer turn.

        The region's jitter is drawn from a generator seeded by the row and ``issue`` (the SFT step), so a
        resumed run rebuilds the same traces and each epoch shows a row through another crop."""
        from actors.env import zoom_region
        from data.prompts import box_to_frame
        from rewards.think import brief_think

        width, height = row["width"], row["height"]
        rng = random.Random(f"{row['id']}#{issue}")
        jitter = self.zoom_jitter
        context = self.zoom_context * (1.0 + jitter * rng.random())
        offset = (jitter * rng.uniform(-1.0, 1.0), jitter * rng.uniform(-1.0, 1.0))
        region = zoom_region(row["boxes"], width=width, height=height, context=context,
                             min_side=self.env.config.min_crop_side, offset=offset)
        zoom_box = box_to_frame(region, frame=self.frame, width=width, height=height,
                                input_size=self.env.limits.input_size(width, height))
        # Only rows with an animal zoom, so the first think is "present"; the category follows it unless the
        # answer turn names the animal from the crop.
        think = brief_think(True, None if self.zoom_names_after else row["category"])
        turn = self._model_turn(f"<think>{think}</think><zoom>{json.dumps(zoom_box)}</zoom>",
                                ends_turn=False)  # the environment closes a zoom turn
        built.add_model_turn(turn)
        seen = self.env.step(built.episode, zoom_box, last_token=turn.token_ids[-1])
        built.episode.advance(seen)
        built.add_env_turn(seen.token_ids, seen.image)
        # The answer is about the crop the environment cut (the box in the frame may round a pixel).
        left, top, right, bottom = seen.crop_box
        in_crop = {**row, "width": right - left, "height": bottom - top,
                   "boxes": [[b[0] - left, b[1] - top, b[2] - left, b[3] - top] for b in row["boxes"]]}
        return in_crop, seen.image.size


class WeightSnapshots:
    """The last ``keep`` weight snapshots of a run, ``<root>/step_N`` model directories, and their average.

    Snapshots are taken every ``every`` steps and at a run's last step. A last step off that grid (a run stopped
    on max_seconds, or steps not a multiple of ``every``) is a run's end only until a resume or a longer run trains
    past it: the next snapshot replaces it, so a run in parts averages what an uninterrupted one would."""

    def __init__(self, root: Path, *, keep: int, every: int):
        self.root, self.keep, self.every = root, keep, every

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(d.name.removeprefix("step_")) for d in self.root.glob("step_*") if d.is_dir())

    def take(self, learner, step: int) -> None:
        """Save the learner's weights as ``step_<step>``, drop an earlier end off the grid and keep the last ``keep``."""
        learner.save_pretrained(self.root / f"step_{step}")
        self._keep_last()

    def _keep_last(self) -> None:
        steps = self.steps()
        off_grid = [s for s in steps[:-1] if s % self.every]  # earlier ends, which a later step trained past
        on_grid = [s for s in steps if s not in off_grid]
        for old in off_grid + on_grid[:-self.keep]:
            shutil.rmtree(self.root / f"step_{old}")

    def continue_from(self, earlier_root: Path, *, step: int) -> None:
        """Copy in the snapshots of the run this one continues (``earlier_root``, up to ``step``, those not here
        already), keeping the last ``keep``: a continued run averages over its whole trajectory, not only over
        the steps it trained itself (an SFT control continued from an earlier control for a few more steps).
        Its own directory adds nothing: every step there is here already. Snapshots the earlier run had already
        pruned (continued from a checkpoint before its last ``keep`` snapshots) cannot be had: that is logged."""
        earlier = WeightSnapshots(earlier_root, keep=self.keep, every=self.every)
        for old in (s for s in earlier.steps() if s <= step and s not in self.steps()):
            shutil.copytree(earlier_root / f"step_{old}", self.root / f"step_{old}")
        self._keep_last()
        wanted = list(range(self.every, step + 1, self.every))[-self.keep:]
        if missing := sorted(set(wanted) - set(self.steps())):
            log.warning("SFT snapshots: %s holds none at steps %s (pruned by its later snapshots), so the average "
                        "of this continued run lacks them", earlier_root, missing)

    def discard_after(self, step: int) -> None:
        """Delete snapshots past ``step``: left by a run that stopped after its last checkpoint, which a resume
        from that checkpoint trains again."""
        for later in (s for s in self.steps() if s > step):
            shutil.rmtree(self.root / f"step_{later}")

    def average(self, out_dir: Path) -> list[int]:
        """Write the average of the kept snapshots to ``out_dir``; returns their steps."""
        from models.average import average_checkpoints

        steps = self.steps()
        if len(steps) < self.keep:
            log.info("SFT average: %d snapshots (steps %s), fewer than average_last=%d: the run was shorter",
                     len(steps), steps, self.keep)
        average_checkpoints([self.root / f"step_{step}" for step in steps], out_dir)
        log.info("SFT model: the weight average of the snapshots at steps %s (%s)", steps, out_dir)
        return steps


def expected_last_step(step: int, end_step: int, *, first_step: int, elapsed_s: float,
                       left_s: float | None) -> int:
    """The step SFT will stop at: ``end_step``, or sooner where the seconds left under ``max_seconds`` (``left_s``;
    None: no bound) run out first at this run's pace so far (``elapsed_s`` over ``step - first_step`` steps).

    A control bounded by time has an ``sft.steps`` far beyond what it reaches (bench.learning sets 100 × the
    SFT's): a progress bar over that total showed a 20-hour ETA for a 6-minute run.
    """
    if left_s is None or step <= first_step:
        return end_step
    seconds_per_step = elapsed_s / (step - first_step)
    return min(end_step, step + max(0, math.ceil(left_s / seconds_per_step)))


def run_sft(config, *, out_dir: str | Path, init_from: str | Path | None = None, resume: bool = False,
            progress: Callable[[int, int], None] | None = None, out_setting: str = "--out") -> SFTSummary:
    """Supervised fine-tuning of ``config.model`` on ``config.data``'s training rows (``config.sft``).

    Writes ``<out_dir>/checkpoints/step_N`` (learner checkpoints, each also a model directory),
    ``sft_events.jsonl`` and ``sft_summary.json``; with ``sft.average_last``, ``snapshots/step_N`` and their
    weight average ``average/`` (the summary's ``model``). ``init_from``: start from that checkpoint's full state
    (weights, optimiser, step) and write to ``out_dir`` (the SFT control), its run's snapshots up to that step
    counting as this run's earlier ones (the average spans the whole trajectory); ``resume``: continue from
    ``out_dir``'s last complete checkpoint (a continuation that wrote none yet starts again from its
    ``init_from``, which it records); neither: a fresh run, which refuses an ``out_dir`` holding an earlier
    run's checkpoints, and a resume refuses one trained with other settings (``out_setting``: what the errors
    name ``out_dir`` by). Starts a local Ray when none is running.
    """
    import ray

    from deploy.learner_group import LearnerGroup
    from deploy.training_data import prepare_training_data
    from deploy.worker_env import actor_env
    from learner.batch import collate
    from learner.checkpoint import (CHECKPOINTS_DIR, complete_checkpoints, latest_complete, read_trainer_state,
                                    refuse_earlier_run)
    from learner.loss import SFT_NLL
    from models.config import resolve_model_path
    from models.processor import load_processor

    sft: SFTConfig = config.sft
    if sft is None:
        raise ValueError("sft: the config has no sft section")
    out = Path(out_dir)
    if not resume and init_from is None:  # a fresh run here would leave the earlier one's later checkpoints
        refuse_earlier_run(out, setting=out_setting)
    if init_from is not None:  # a continuation with no step left would write a copy of its start and call it done
        from_step = int(read_trainer_state(init_from)["extra_state"].get(SFT_STEP_KEY, 0))
        if from_step >= sft.steps:
            raise ValueError(f"sft.steps: {sft.steps}, but --init-from {init_from} is at step {from_step}, so there is "
                             "nothing to train (steps count from the first run's step 0: raise sft.steps, and bound the "
                             "time with sft.max_seconds)")
        # Later checkpoints here are another run's (an earlier continuation): a --resume would take them for this one's.
        later = [path for s, path in complete_checkpoints(out / CHECKPOINTS_DIR) if s > from_step]
        if later:
            raise ValueError(f"{out_setting}: {out} holds a run past --init-from's step {from_step} (checkpoint "
                             f"{later[-1].name}), which a --resume of this one would continue; set another "
                             f"{out_setting}")
    model_path = str(resolve_model_path(config.model))
    settings = sft_settings(config, model_path=model_path)
    if resume:
        check_same_settings(out, settings, setting=out_setting)
        recorded_start = out / INIT_FROM_FILE
        if recorded_start.is_file() and latest_complete(out / CHECKPOINTS_DIR) is None:
            # A continuation stopped before its first checkpoint: from step 0 it would train the base model in the
            # continuation's directory, under its name.
            init_from = json.loads(recorded_start.read_text())["checkpoint"]
            log.info("%s holds a continuation of %s with no checkpoint yet: it starts there again", out, init_from)
    ckpt_root = out / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    (out / SFT_SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    if init_from is not None:
        (out / INIT_FROM_FILE).write_text(json.dumps({"checkpoint": str(Path(init_from).resolve())}, indent=2))
    data = prepare_training_data(config.data)
    processor = load_processor(model_path)
    batches = SupervisedBatches(data=data, rollout_config=config.rollout, processor=processor, think=sft.think,
                                zoom_context=sft.zoom_context, zoom_jitter=sft.zoom_jitter,
                                zoom_names_after=sft.zoom_names_after)
    if not ray.is_initialized():
        ray.init(num_cpus=config.cluster.num_cpus, include_dashboard=False, runtime_env={"env_vars": actor_env()})
    learner = LearnerGroup(sft_learner_config(config.learner, sft, model_path=model_path),
                           image_processor=processor.image_processor,
                           pad_token_id=processor.tokenizer.pad_token_id, env_vars=actor_env())
    start_from = Path(init_from) if init_from else (latest_complete(ckpt_root) if resume else None)
    step, seconds_before = 0, 0.0
    if start_from is not None:
        extra = learner.load_checkpoint(start_from)
        step = int(extra.get(SFT_STEP_KEY, 0))
        # A resume counts the seconds this run trained before it (``max_seconds`` and ``wall_s`` are the whole
        # run's); a run started from another run's checkpoint (the SFT control) counts from 0.
        seconds_before = float(extra.get("wall_s", 0.0)) if init_from is None else 0.0
        log.info("SFT continues from %s at step %d (%.0f s trained before)", start_from, step, seconds_before)
    trim_events(out / SFT_EVENTS_FILE, last_step=step)  # steps trained again, or a line a crash cut
    snapshots = (WeightSnapshots(out / SNAPSHOT_DIR, keep=sft.average_last, every=sft.average_every)
                 if sft.average_last else None)
    if snapshots is not None:
        snapshots.discard_after(step)
        if init_from is not None:  # <run>/checkpoints/step_N: that run's snapshots are this one's past
            snapshots.continue_from(Path(init_from).parent.parent / SNAPSHOT_DIR, step=step)
    order = row_order(batches.data.rows, seed=sft.seed, easy_first=sft.easy_first)
    for _ in range(step * sft.batch_samples):  # the rows earlier steps consumed (exact resume)
        next(order)

    start, first_step = time.perf_counter(), step

    def trained_s() -> float:
        return seconds_before + time.perf_counter() - start

    recorded_s: float | None = None  # the seconds trained that the last checkpoint written here records

    def save_checkpoint() -> str:  # at the current step, with the seconds trained up to it
        nonlocal recorded_s
        recorded_s = trained_s()
        return learner.save_checkpoint(ckpt_root, extra_state={SFT_STEP_KEY: step, "wall_s": recorded_s})

    saved_step = step  # the step of the last checkpoint written (or started from)
    recent: list[float] = []
    checkpoint = str(start_from) if start_from else None
    end_step = sft.steps

    def next_batch(issue: int):  # the batch of the step after ``issue`` steps (on the prefetch thread only)
        groups = [batches.group(next(order), issue=issue) for _ in range(sft.batch_samples)]
        return collate(groups, image_processor=processor.image_processor,
                       pad_token_id=processor.tokenizer.pad_token_id, advantages=[[0.0]] * len(groups))

    try:
        # The next batch is built while the learner steps: the driver waits on Ray meanwhile (GIL released), and
        # building it in between cost every step about 0.08 s. A batch built for a step that never runs (the
        # run stopped on max_seconds) is dropped; a resume skips only the rows of the steps trained.
        with (out / SFT_EVENTS_FILE).open("a") as events, ThreadPoolExecutor(1, "sft-batches") as prefetch:
            upcoming = prefetch.submit(next_batch, step) if step < end_step else None
            while step < end_step:
                if sft.max_seconds is not None and trained_s() >= sft.max_seconds:
                    log.info("SFT stops on max_seconds (%.0f s) after step %d", sft.max_seconds, step)
                    if progress is not None:
                        progress(step, step)  # the bar ends where the run did
                    break
                batch = upcoming.result()
                if step + 1 < end_step:
                    upcoming = prefetch.submit(next_batch, step + 1)
                stats = learner.sft_step(batch)
                step += 1
                recent = (recent + [stats[SFT_NLL]])[-sft.log_every:]
                events.write(json.dumps({"step": step, "wall_s": trained_s(), **stats}) + "\n")
                events.flush()
                if progress is not None:
                    left_s = None if sft.max_seconds is None else sft.max_seconds - trained_s()
                    progress(step, expected_last_step(step, end_step, first_step=first_step,
                                                      elapsed_s=time.perf_counter() - start, left_s=left_s))
                # The snapshot before the checkpoint of the same step: a run that dies while writing it has no
                # checkpoint at that step, so its resume starts earlier and discards the partial snapshot.
                if snapshots is not None and step % sft.average_every == 0:
                    snapshots.take(learner, step)
                if sft.checkpoint_every and step % sft.checkpoint_every == 0 and step < end_step:
                    checkpoint = save_checkpoint()
                    saved_step = step
                if step % sft.log_every == 0 or step == end_step:
                    elapsed = time.perf_counter() - start
                    log.info("sft step %d/%d  nll %.4f  lr %.2e  %.1f s/step", step, end_step,
                             sum(recent) / len(recent), stats["learner/lr"], elapsed / (step - first_step))
            if snapshots is not None and step > first_step and step not in snapshots.steps():
                snapshots.take(learner, step)  # the last step (max_seconds, or steps not a multiple)
            if step > saved_step:
                checkpoint = save_checkpoint()
            # As the last checkpoint records it: writing it, averaging and shutdown are not training (a control
            # continued from it must see the same figure). A run that made no step trained only the seconds before.
            trained = recorded_s if recorded_s is not None else seconds_before
    finally:
        learner.shutdown()
    if checkpoint is None:
        raise ValueError("SFT made no step (max_seconds too small?) and had no checkpoint to start from")
    model, averaged_steps = checkpoint, []
    if snapshots is not None and snapshots.steps():
        averaged_steps = snapshots.average(out / AVERAGE_DIR)
        model = str(out / AVERAGE_DIR)
    summary = SFTSummary(steps=step, checkpoint=checkpoint, model=model, wall_s=trained,
                         nll=sum(recent) / len(recent) if recent else None, rows=len(batches.data.rows),
                         events_path=str(out / SFT_EVENTS_FILE), averaged_steps=averaged_steps)
    (out / SFT_SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2))
    return summary
