"""Learner throughput on one CUDA GPU, in this process (no Ray): GRPO training tokens per second.

Prints ONE JSON object. Each configuration is one ``Learner`` (world size 1) on the same synthetic
batch; the baseline, measured in the same run, is the same DeepSpeed ZeRO-3 rank in float32:

    zero3_bf16   DeepSpeed ZeRO-3, bf16 weights and compute, fp32 master weights (the GPU default)
    zero3_fp32   the same in float32 (the baseline)
    zero0_bf16   DeepSpeed without partitioning, bf16: what ZeRO-3's gathers and hooks cost at world size 1

Model: the ``small`` default shape (``models.build.SIZES["small"]``), random weights (no warm start:
throughput does not depend on them). Batch: ``bench.learner.synthetic_batch``, ``--groups`` x ``--samples``
samples, 112-px images (16 image tokens), completions of 32-96 tokens. Time: wall clock around
``Learner.step``, after ``--warmup-steps`` untimed steps; a step ends by reading its statistics on the
host, so the GPU's work is finished when the clock stops. A configuration that fails is reported with
its error instead of numbers.

    python -m bench.learner_gpu [--groups 16] [--samples 8] [--micro 32] [--steps 5] [--warmup-steps 2]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    # Run as a script, this file's folder is sys.path[0] and would shadow the `learner` package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

# bench.learner defaults DeepSpeed to its CPU accelerator for its Ray ranks; here it must detect CUDA.
if torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cuda")

from bench.learner import synthetic_batch  # noqa: E402

log = logging.getLogger("bench.learner_gpu")

CONFIGS = {
    "zero3_bf16": dict(backend="deepspeed", zero_stage=3, bf16=True),
    "zero3_fp32": dict(backend="deepspeed", zero_stage=3, bf16=False),
    "zero0_bf16": dict(backend="deepspeed", zero_stage=0, bf16=True),
}
BASELINE = "zero3_fp32"


def measure(model_dir: str, batch, *, micro: int, steps: int, warmup: int, **overrides) -> dict:
    """Tokens per second of ``steps`` GRPO steps of one learner built with ``overrides``."""
    from learner.config import LearnerConfig
    from learner.learner import Learner

    config = LearnerConfig(model_path=model_dir, global_batch_samples=batch.num_samples, micro_batch_samples=micro,
                           lr=1e-5, **{"device": "cuda", **overrides})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    learner = Learner(config)
    result = {"startup_seconds": time.perf_counter() - start}
    try:
        for _ in range(warmup):
            learner.step(batch)
        start = time.perf_counter()
        for _ in range(steps):
            learner.step(batch)
        seconds = time.perf_counter() - start
        result.update(tokens_per_second=batch.num_loss_tokens * steps / seconds, step_seconds=seconds / steps)
        if torch.cuda.is_available():
            result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        del learner
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=16, help="groups per global batch")
    parser.add_argument("--samples", type=int, default=8, help="samples per group")
    parser.add_argument("--micro", type=int, default=32, help="micro-batch samples")
    parser.add_argument("--steps", type=int, default=5, help="timed optimiser steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="configurations to run, comma-separated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        return {"error": "torch sees no CUDA device"}

    from models.build import RECIPES, build_model

    workdir = Path(tempfile.mkdtemp(prefix="bench_learner_gpu_"))
    start = time.perf_counter()
    model_dir = str(build_model(size="small", out_dir=workdir / "small",
                                recipe=RECIPES["small"].model_copy(update={"warm_start": None})))
    batch = synthetic_batch(model_dir, groups=args.groups, samples=args.samples)
    report = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": "small (random weights)",
        "setup_seconds": time.perf_counter() - start, "global_batch_samples": batch.num_samples,
        "micro_batch_samples": args.micro, "tokens_per_step": batch.num_loss_tokens,
        "sequence_length": int(batch.input_ids.shape[1]), "steps": args.steps, "warmup_steps": args.warmup_steps,
    }
    runs = {}
    for name in [c for c in args.configs.split(",") if c]:
        try:
            runs[name] = measure(model_dir, batch, micro=args.micro, steps=args.steps, warmup=args.warmup_steps,
                                 **CONFIGS[name])
        except Exception as error:  # one failing configuration must not hide the others' numbers
            log.exception("configuration %s failed", name)
            runs[name] = {"error": f"{type(error).__name__}: {error}"}
    report["runs"] = runs
    base = runs.get(BASELINE, {}).get("tokens_per_second")
    if base:
        report[f"speedup_over_{BASELINE}"] = {name: r["tokens_per_second"] / base
                                              for name, r in runs.items() if "tokens_per_second" in r}
    return report


def main(argv: list[str] | None = None) -> None:
    # Libraries print progress to stdout; stdout is for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        report = run(argv)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
