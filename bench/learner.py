"""Learner throughput on CPU: ZeRO-3 ranks, one image encoding per group, and weight export cost.

Prints ONE JSON object with three parts, each against a baseline measured in the same run:

throughput: GRPO training tokens per second of a ``LearnerGroup`` (Ray actors, DeepSpeed ZeRO-3,
    gloo) with 1 rank (baseline; all CPUs to it) and 2 ranks (1 CPU each), for the tiny and the small
    default models (``models.build``). Time is the driver's wall clock around ``LearnerGroup.step``
    (transfer of the batch included), after ``--warmup-steps`` untimed steps.
encoding: forward + backward time of ``learner.forward.sequence_logprobs`` with the vision tower run
    once per group image vs once per sample (the baseline), at 4 and 8 samples per image; wall and
    CPU seconds, one thread, best of ``--repeats`` alternating rounds.
export: seconds to stream the full weights out of a 1-rank ZeRO-3 learner (``export_weights``, gathers
    included; same process, one thread) and out of the 2-rank group (Ray transfer included), as
    ratios of a plain ``{name: tensor.clone()}`` copy of the same model's ``state_dict()`` (the baseline).

The batch: ``--groups`` groups × ``--samples`` samples, 112-px images (16 image tokens, as the
synthetic data set), completions of 32-96 random tokens. Several figures share 2 CPU cores with
anything else running on the machine: ``load_average`` is reported so that runs can be compared.

    python -m bench.learner [--sizes tiny,small] [--steps 3] [--warmup-steps 1]
    (``python bench/learner.py`` works too)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    # Run as a script, this file's folder is sys.path[0] and this file would shadow the `learner` package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup  # noqa: E402
from learner.batch import LearnerBatch, collate  # noqa: E402

IMAGE_SIZE = 112  # px; 4 × 4 merged 28-px cells = 16 image tokens
COMPLETION_RANGE = (32, 96)


def synthetic_groups(model_dir: str, *, groups: int, samples: int, seed: int = 0) -> list[TrajectoryGroup]:
    from PIL import Image
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    vocab = config.text_config.vocab_size
    rng = np.random.default_rng(seed)
    pads = (IMAGE_SIZE // 28) ** 2
    out = []
    for g in range(groups):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(buffer, format="PNG")
        prompt = ([config.vision_start_token_id] + [config.image_token_id] * pads + [config.vision_end_token_id]
                  + rng.integers(20, min(vocab, 1000), 24).tolist())
        trajectories = []
        for i in range(samples):
            n = int(rng.integers(*COMPLETION_RANGE))
            trajectories.append(Trajectory(sample_index=i, prompt_ids=prompt,
                                           completion_ids=rng.integers(20, min(vocab, 1000), n).tolist(),
                                           behaviour_logprobs=[-2.0] * n, loss_mask=[1] * n, completion_text="",
                                           reward=float(rng.random())))
        out.append(TrajectoryGroup(
            prompt=PromptGroup(group_id=f"b{g}", prompt_id=f"b{g}", task="camo", difficulty="easy", question="?",
                               image=buffer.getvalue(), target=Target(False, None, [], IMAGE_SIZE, IMAGE_SIZE), stage=1),
            trajectories=trajectories, policy_version=0))
    return out


def synthetic_batch(model_dir: str, *, groups: int, samples: int) -> LearnerBatch:
    from transformers import AutoImageProcessor

    from learner.advantages import group_advantages

    data = synthetic_groups(model_dir, groups=groups, samples=samples)
    advantages = group_advantages([[t.reward for t in g.trajectories] for g in data])
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    return collate(data, image_processor=processor, pad_token_id=0, advantages=advantages)


def learner_config(model_dir: str, *, world_size: int, global_batch: int, micro: int):
    from learner.config import LearnerConfig

    return LearnerConfig(model_path=model_dir, world_size=world_size, global_batch_samples=global_batch,
                         micro_batch_samples=micro, num_cpus_per_rank=2 // world_size, lr=1e-5)


def measure_throughput(model_dir: str, batch: LearnerBatch, *, world_size: int, micro: int, steps: int,
                       warmup: int, export: bool) -> dict:
    from deploy.learner_group import LearnerGroup
    from learner.export import assemble_state_dict

    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}
    start = time.perf_counter()
    group = LearnerGroup(learner_config(model_dir, world_size=world_size, global_batch=batch.num_samples, micro=micro),
                         env_vars=env)
    result = {"startup_seconds": time.perf_counter() - start}
    try:
        for _ in range(warmup):
            group.step(batch)
        start = time.perf_counter()
        for _ in range(steps):
            group.step(batch)
        seconds = time.perf_counter() - start
        result.update(tokens_per_second=batch.num_loss_tokens * steps / seconds, step_seconds=seconds / steps)
        if export:
            start = time.perf_counter()
            assemble_state_dict(group.export_weights())
            result["export_seconds"] = time.perf_counter() - start
    finally:
        group.shutdown()
    return result


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _best(repeats: int, fns: dict) -> dict[str, tuple[float, float]]:
    """Best (wall, cpu) of each function over ``repeats`` rounds; the functions alternate within a
    round so that background load hits them alike, and the minimum discards interrupted runs."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = _timed(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def measure_encoding(model_dir: str, *, samples_per_image: int, groups: int, repeats: int) -> dict:
    from transformers import AutoModelForImageTextToText

    from learner.forward import sequence_logprobs

    model = AutoModelForImageTextToText.from_pretrained(model_dir).train()
    batch = synthetic_batch(model_dir, groups=groups, samples=samples_per_image)

    def fwd_bwd(once: bool) -> None:
        logprobs, _ = sequence_logprobs(model, batch, encode_images_once_per_group=once)
        (logprobs * batch.completion_mask).sum().backward()
        model.zero_grad(set_to_none=True)

    fwd_bwd(True), fwd_bwd(False)  # warm-up: first calls pay one-off kernel set-up
    best = _best(repeats, {"per_sample": lambda: fwd_bwd(False), "once": lambda: fwd_bwd(True)})
    return {"samples": batch.num_samples,
            "per_sample_encoding_seconds": best["per_sample"][0], "once_per_group_seconds": best["once"][0],
            "per_sample_encoding_cpu_seconds": best["per_sample"][1], "once_per_group_cpu_seconds": best["once"][1],
            "speedup": best["per_sample"][0] / best["once"][0], "speedup_cpu": best["per_sample"][1] / best["once"][1]}


def measure_export(model_dir: str, *, repeats: int) -> dict:
    """1-rank ZeRO-3 export in this process vs a state_dict copy of the same model."""
    from transformers import AutoModelForImageTextToText

    from learner.export import assemble_state_dict
    from learner.learner import Learner

    plain = AutoModelForImageTextToText.from_pretrained(model_dir)
    learner = Learner(learner_config(model_dir, world_size=1, global_batch=4, micro=4))
    best = _best(repeats, {"copy": lambda: {k: v.clone() for k, v in plain.state_dict().items()},
                           "export": lambda: assemble_state_dict(learner.export_weights())})
    return {"state_dict_copy_seconds": best["copy"][0], "zero3_1rank_export_seconds": best["export"][0],
            "state_dict_copy_cpu_seconds": best["copy"][1], "zero3_1rank_export_cpu_seconds": best["export"][1],
            "ratio_1rank": best["export"][0] / best["copy"][0], "ratio_1rank_cpu": best["export"][1] / best["copy"][1]}


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small", help="model sizes from models.build, comma-separated")
    parser.add_argument("--groups", type=int, default=4, help="groups per global batch")
    parser.add_argument("--samples", type=int, default=4, help="samples per group")
    parser.add_argument("--micro", type=int, default=4, help="micro-batch samples per rank")
    parser.add_argument("--steps", type=int, default=3, help="timed optimiser steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the encoding/export timings (best kept)")
    args = parser.parse_args(argv)

    import logging

    import ray

    logging.basicConfig(level=logging.WARNING)
    from models.build import RECIPES, SIZES, build_model

    # Random weights: throughput does not depend on them, and the small recipe's warm start takes minutes.
    RANDOM = {size: recipe.model_copy(update={"warm_start": None}) for size, recipe in RECIPES.items()}

    os.environ.setdefault("RAY_TMPDIR", str(Path(tempfile.gettempdir()) / "ray"))
    report = {"load_average_start": os.getloadavg()[0], "cpus": os.cpu_count(), "notes": []}
    sizes = [s for s in args.sizes.split(",") if s]
    workdir = Path(tempfile.mkdtemp(prefix="bench_learner_"))
    model_dirs = {}
    for size in sizes:
        if size not in SIZES:
            report["notes"].append(f"size {size!r} is not in models.build.SIZES; skipped")
            continue
        model_dirs[size] = str(build_model(size=size, out_dir=workdir / size, recipe=RANDOM[size]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        throughput = {}
        for size, model_dir in model_dirs.items():
            batch = synthetic_batch(model_dir, groups=args.groups, samples=args.samples)
            runs = {f"ranks_{w}": measure_throughput(model_dir, batch, world_size=w, micro=args.micro, steps=args.steps,
                                                     warmup=args.warmup_steps, export=(w == 2))
                    for w in (1, 2)}
            params = sum(p.numel() for p in _load(model_dir).parameters())
            throughput[size] = {"parameters": params, "global_batch_samples": batch.num_samples,
                                "tokens_per_step": batch.num_loss_tokens, **runs,
                                "speedup_2_ranks_over_1": runs["ranks_2"]["tokens_per_second"]
                                / runs["ranks_1"]["tokens_per_second"]}
        report["throughput"] = throughput
    finally:
        ray.shutdown()
    # In-process timings run on ONE thread: with other work on the 2 cores, a second OpenMP thread mostly
    # spins and waits, which swamps the differences measured here.
    torch.set_num_threads(1)
    encode_size = "small" if "small" in model_dirs else next(iter(model_dirs))
    report["encoding"] = {"model": encode_size, **{
        f"samples_per_image_{n}": measure_encoding(model_dirs[encode_size], samples_per_image=n, groups=2,
                                                   repeats=args.repeats) for n in (4, 8)}}
    export = measure_export(model_dirs[encode_size], repeats=2 * args.repeats)  # cheap: more rounds, less noise
    two_rank = report["throughput"][encode_size]["ranks_2"].get("export_seconds")
    if two_rank is not None:
        export.update(group_2rank_export_seconds=two_rank, ratio_2rank=two_rank / export["state_dict_copy_seconds"])
    report["export"] = {"model": encode_size, **export}
    report["load_average_end"] = os.getloadavg()[0]
    return report


def _load(model_dir: str):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir)


def main(argv: list[str] | None = None) -> None:
    # Libraries print progress to stdout (DeepSpeed's op builder among them); stdout is for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        report = run(argv)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
