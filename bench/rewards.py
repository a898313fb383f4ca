"""Reward throughput: one RewardWorker actor under Ray vs the plain functions, same run, same data.

Prints ONE JSON object. The data set is a seeded synthetic mix of what the reward actors see:
camo prompts with an object (one box), camo prompts without one, detection with several boxes and
confidences, classification (category only), and a share of malformed completions (truncated,
stray text, no answer). Completions come in GRPO groups (``--group-size`` samples of one prompt
share its Target object, as in a TrajectoryGroup), so a target crosses to the actor once per group.
Boxes are written in the configured frame (default: Qwen2.5-VL's model-input pixels) so the frame
conversion is part of the measured work.

plain: ``rewards.compose.score_batch`` in this process, batch by batch.
worker: the same batches sent to one ``ray.remote(RewardWorker)`` actor (``score_request``) with
every call of a pass in flight at once (how a driver keeps its reward actor busy); the time
includes building each columnar ``ScoreRequest`` (``from_rows``), sending it, receiving the
``RewardColumns`` and turning them back into the ``RewardBatch`` that plain returns.
worker_sequential: the same, one call at a time, so transport never overlaps scoring (the
pessimistic figure). The three alternate pass by pass, in rotating order; each is repeated
``--repeats`` times and its best pass is reported.
Also reported: the actor's own scoring time (a worker pass minus it is transport), and CPU-time
rates of plain scoring, of the actor's scoring and of a whole worker pass (driver and actor
processes, all threads), which hold still when other jobs load the machine (wall-clock ratios on a
shared 2-core box move by +-15% from run to run, more under heavy load).

Request size: a call to the actor has a fixed cost of ~9 ms (Ray's task round trip, fetching the
request and putting the result in the object store), against ~13.5 us of scoring per completion.
Measured on 2 cores: at 8,192 completions per request the ratio was 0.86-0.92 (nine runs), at 16,384
0.91-0.95 (six runs; the default: a worker fed by several rollout workers gets large requests; the
smaller the request, the larger the fixed cost's share). Each pass streams 262,144 completions
(16 requests) so that filling and draining the pipeline, once per pass, weigh little.

    python -m bench.rewards [--completions 262144] [--batch-size 16384] [--repeats 5]
    (``python bench/rewards.py`` works too)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

if not __package__:
    # Run as a script, this file's folder is sys.path[0] and this file would shadow the `rewards` package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from actors.reward import STAT_CPU_SECONDS, STAT_SECONDS, RewardWorker, ScoreRequest
from actors.types import Target
from rewards.compose import score_batch
from rewards.config import RewardConfig
from rewards.frames import from_original

TASKS = ("camo_object", "camo_empty", "detect", "classify", "malformed")
TASK_SHARES = (0.35, 0.2, 0.2, 0.15, 0.1)
CATEGORIES = ("moth", "crab", "stick insect", "flounder", "owl", "frog")
WORDS = "the texture of the bark matches its wings but an edge breaks the pattern near the left".split()


def _think(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 90)))


def _box(rng: random.Random, width: int, height: int) -> list[float]:
    x1, y1 = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
    return [x1, y1, min(width, x1 + rng.uniform(8, width * 0.4)), min(height, y1 + rng.uniform(8, height * 0.4))]


def _jitter(rng: random.Random, box: list[float]) -> list[float]:
    return [v + rng.uniform(-6, 6) for v in box]


def _prompt(rng: random.Random, task: str) -> Target:
    width, height = rng.choice([(640, 480), (800, 600), (1024, 768), (512, 512)])
    category = rng.choice(CATEGORIES)
    if task == "camo_empty":
        return Target(present=False, category=None, boxes=[], width=width, height=height)
    if task == "classify":
        return Target(present=True, category=category, boxes=[], width=width, height=height)
    n_boxes = rng.randint(2, 5) if task == "detect" else 1
    boxes = [_box(rng, width, height) for _ in range(n_boxes)]
    return Target(present=True, category=category, boxes=boxes, width=width, height=height)


def _completion(rng: random.Random, task: str, target: Target, config: RewardConfig) -> str:
    """One sampled answer to the prompt, boxes written in the configured frame."""
    width, height = target.width, target.height
    frame = config.frame.spec(width=width, height=height)

    def written(boxes: list[list[float]]) -> list[list[int]]:
        return [[round(v) for v in b] for b in from_original(boxes, frame=frame, width=width, height=height)]

    if task == "camo_empty":
        says_empty = rng.random() < 0.7
        answer = {"present": not says_empty, "category": None if says_empty else rng.choice(CATEGORIES),
                  "boxes": [] if says_empty else written([_box(rng, width, height)])}
    elif task == "detect":
        predicted = [_jitter(rng, b) for b in target.boxes[: rng.randint(1, len(target.boxes))]]
        predicted += [_box(rng, width, height) for _ in range(rng.randint(0, 2))]
        answer = {"present": True, "category": target.category, "boxes": written(predicted),
                  "confidences": [round(rng.random(), 2) for _ in predicted]}
    elif task == "classify":
        guess = rng.choice((target.category, f"{target.category}s", rng.choice(CATEGORIES)))
        answer = {"present": True, "category": guess, "boxes": []}
    else:  # camo_object, and the base of malformed
        answer = {"present": True, "category": target.category, "boxes": written([_jitter(rng, target.boxes[0])])}
    text = f"<think>{_think(rng)}</think>\n<answer>{json.dumps(answer)}</answer>"
    if task == "malformed":
        text = rng.choice([text[: rng.randint(0, len(text))], "Sure! " + text, text.replace('"', "'"), _think(rng)])
    return text


def make_data(n: int, *, seed: int, config: RewardConfig, group_size: int) -> tuple[list[str], list[Target]]:
    """n completions in GRPO groups: the ``group_size`` samples of a prompt share its Target object."""
    rng = random.Random(seed)
    completions: list[str] = []
    targets: list[Target] = []
    while len(completions) < n:
        task = rng.choices(TASKS, weights=TASK_SHARES)[0]
        target = _prompt(rng, "camo_object" if task == "malformed" else task)
        for _ in range(group_size):
            completions.append(_completion(rng, task, target, config))
            targets.append(target)
    return completions[:n], targets[:n]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=262_144, help="completions scored per pass")
    parser.add_argument("--batch-size", type=int, default=16_384, help="completions per request to the actor")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frame", choices=("original", "input", "norm1000"), default="input")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt sharing one Target")
    args = parser.parse_args()

    import ray  # only the benchmark needs Ray; the packages it measures do not import it

    config = RewardConfig(frame={"kind": args.frame})
    weights = dict(config.default_weights)
    completions, targets = make_data(args.completions, seed=0, config=config, group_size=args.group_size)
    batches = list(zip(_chunks(completions, args.batch_size), _chunks(targets, args.batch_size)))

    # Ray starts worker processes at niceness 15 by default; on a shared machine that alone slows the
    # actor against the plain baseline, which runs at this process's priority. Compare like with like.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(RewardWorker).remote(config)
        ray.get(actor.score.remote(completions[:256], targets[:256], weights=weights))  # warm-up
        ray.get(actor.stats.remote(reset=True))

        def plain_pass() -> list:
            return [score_batch(c, t, config=config, weights=weights) for c, t in batches]

        def request(completions: list[str], targets: list[Target]) -> ScoreRequest:
            return ScoreRequest.from_rows(completions, targets, weights=weights)

        def worker_pass() -> list:  # every call in flight at once, as a driver keeps its actor busy
            refs = [actor.score_request.remote(request(c, t)) for c, t in batches]
            # Each result is unpacked as it arrives (as the driver does), while the actor scores the next.
            return [ray.get(ref).to_batch() for ref in refs]

        def worker_sequential_pass() -> list:  # one call at a time: transport never overlaps scoring
            return [ray.get(actor.score_request.remote(request(c, t))).to_batch() for c, t in batches]

        def actor_process_cpu() -> float:  # every thread of the actor's process, Ray's own included
            return ray.get(actor.__ray_call__.remote(lambda _: time.process_time()))

        sides = {"plain": plain_pass, "worker": worker_pass, "worker_sequential": worker_sequential_pass}
        names = (*sides, "inside_actor", "plain_cpu", "inside_actor_cpu", "worker_cpu", "worker_sequential_cpu")
        seconds: dict[str, list[float]] = {name: [] for name in names}
        results: dict[str, list] = {}
        for rep in range(args.repeats):
            # Rotate the order every pass so no side always follows the same neighbour on a shared machine.
            order = list(sides)[rep % 3 :] + list(sides)[: rep % 3]
            for name in order:
                start_actor_cpu = actor_process_cpu() if name != "plain" else 0.0
                start, start_cpu, start_process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
                results[name] = sides[name]()
                seconds[name].append(time.perf_counter() - start)
                if name == "plain":
                    seconds["plain_cpu"].append(time.thread_time() - start_cpu)
                else:  # time the actor spent scoring in that pass; the rest was transport
                    driver_cpu = time.process_time() - start_process_cpu
                    seconds[f"{name}_cpu"].append(driver_cpu + actor_process_cpu() - start_actor_cpu)
                    stats = ray.get(actor.stats.remote(reset=True))
                    seconds["inside_actor"].append(stats[STAT_SECONDS])
                    seconds["inside_actor_cpu"].append(stats[STAT_CPU_SECONDS])
        if not results["plain"] == results["worker"] == results["worker_sequential"]:
            raise SystemExit("worker and plain functions disagree")  # the comparison would be void
    finally:
        ray.shutdown()

    rate = {name: args.completions / min(values) for name, values in seconds.items()}
    failures = {name.rsplit("/", 1)[-1]: int(v) for name, v in stats.items() if "/parse_failure/" in name and v}
    print(
        json.dumps(
            {
                "worker_completions_per_s": round(rate["worker"]),
                "plain_completions_per_s": round(rate["plain"]),
                "ratio": round(rate["worker"] / rate["plain"], 3),
                "worker_sequential_completions_per_s": round(rate["worker_sequential"]),
                "ratio_sequential": round(rate["worker_sequential"] / rate["plain"], 3),
                "completions": args.completions,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "frame": args.frame,
                "group_size": args.group_size,
                # Scoring time inside the actor alone (best pass): a worker pass minus this is transport.
                "inside_actor_completions_per_s": round(rate["inside_actor"]),
                # CPU time instead of wall time: what the scoring costs, whatever else runs on the machine.
                "plain_cpu_completions_per_s": round(rate["plain_cpu"]),
                "inside_actor_cpu_completions_per_s": round(rate["inside_actor_cpu"]),
                # The whole CPU cost of a worker pass: driver and actor processes, every thread (Ray's
                # transport threads too), against plain scoring's; steadier than the wall-clock ratio.
                "worker_cpu_completions_per_s": round(rate["worker_cpu"]),
                "ratio_cpu": round(rate["worker_cpu"] / rate["plain_cpu"], 3),
                "worker_sequential_cpu_completions_per_s": round(rate["worker_sequential_cpu"]),
                "task_shares": dict(zip(TASKS, TASK_SHARES)),
                "seconds_per_pass": {name: [round(v, 3) for v in values] for name, values in seconds.items()},
                "parse_failures_per_pass": failures,
                "ray_worker_niceness": int(os.environ["RAY_worker_niceness"]),
                "cpu_count": os.cpu_count(),
                "load_average_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
