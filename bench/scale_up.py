"""How long `refocus scale` holds up a running job: the call that starts a rollout worker, against its engine start.

The driver's loop applies a scale request with ``RolloutFleet.rescale`` and then polls ``admit_started`` twice a
second. Until 2026-11-25 ``rescale`` waited in the loop for the new engine to load (and to be served the current
weights), so no group was dispatched or collected meanwhile; now the worker starts in the background and joins
once it answers. This starts a fleet of one real rollout worker (the run config's engine: vLLM on CPU for
tiny-cpu) on the tiny model, syncs weights to it, asks for a second worker and polls as the driver does.

Prints ONE JSON object: ``rescale_s`` (the loop's time in the call that starts the worker), ``max_poll_s`` (the
longest ``admit_started`` call while it loaded), and the baseline of the same run, ``start_s``: from the request
until the worker answered and held the current weights, what the loop used to be held for. ``verified``: the
new worker's weight checksum equals the learner's.

    .venv/bin/python bench/scale_up.py [--config deploy/configs/tiny-cpu.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TMPDIR", str(REPO / ".tmp" / "ray"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger("bench.scale_up")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "deploy" / "configs" / "tiny-cpu.yaml"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray
    import torch
    from transformers import AutoModelForImageTextToText

    from actors.metrics import RunMetrics
    from deploy.config import load_run_config
    from deploy.rollout_fleet import RolloutFleet
    from deploy.worker_env import actor_env
    from learner.export import export_weights
    from models.config import resolve_model_path

    config = load_run_config(args.config, ["cluster.rollout_workers=1"])
    model_path = str(resolve_model_path(config.model))
    ray.init(num_cpus=config.cluster.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": actor_env()})
    fleet = RolloutFleet(config, model_path=model_path, metrics=RunMetrics())
    try:
        fleet.start(1)
        fleet.await_started()
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
        with torch.no_grad():  # weights the new worker cannot have from its checkpoint
            for parameter in model.parameters():
                parameter.mul_(1.01)
        fleet.sync(export_weights(model, version=1, bucket_bytes=fleet.weight_sync.bucket_bytes))

        requested = time.perf_counter()
        fleet.rescale(2)
        rescale_s = time.perf_counter() - requested
        new = fleet.workers[-1]
        polls = []
        while not new.admitted:
            start = time.perf_counter()
            given_up = fleet.admit_started()
            polls.append(time.perf_counter() - start)
            if given_up:
                raise RuntimeError("; ".join(given_up))
            time.sleep(0.5)  # the driver's poll interval
        start_s = time.perf_counter() - requested
        record = fleet.verify(1)
        result = {
            "engine": config.rollout.engine.backend, "model": model_path,
            "rescale_s": round(rescale_s, 4), "max_poll_s": round(max(polls, default=0.0), 4), "polls": len(polls),
            "start_s": round(start_s, 2), "loop_held_ratio": round(rescale_s / start_s, 5),
            "verified": set(record["workers"].values()) == {record["learner"]},
        }
    finally:
        fleet.kill()
        ray.shutdown()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
