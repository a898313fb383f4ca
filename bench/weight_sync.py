"""Weight sync of the small default model (≈10M params) to 2 rollout-worker actors, per transport.

Prints ONE JSON object. For each transport, ``sync_s`` (WeightSender.sync: buckets in hand -> both
receivers have loaded them into their model and report the version) is compared with ``raw_s``, the
same bytes moved by the same mechanism without our layer: one ``ray.put`` of one flat numpy buffer
that both actors ``ray.get`` (zero-copy), or one broadcast of one flat uint8 tensor over a gloo group
of the same three processes, each triggered by one actor call per receiver. ``apply_s`` is the part of
``sync_s`` the receivers spend in ``HFEngine.load_weights`` (a copy the raw transfer does not do).
``transport_s`` is a sync whose receivers skip the load (``transport_ratio``, per pair like ``ratio``):
our layer's own overhead over the raw mechanism. Medians of ``--repeats`` runs after one warm-up,
sync and raw timed alternately (so that load from other processes hits both alike); ``ratio`` is the
median of the per-pair ratios; ``*_min_s`` the fastest run (on a shared machine, the least
disturbed one). The export from the learner's model is timed apart (``export_s``): it is the
learner's cost, the same for both transports.

    .venv/bin/python bench/weight_sync.py [--repeats 5] [--bucket-mib 256]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TMPDIR", str(REPO / ".tmp" / "ray"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.weights import (  # noqa: E402
    BroadcastGroup,
    WeightReceiverMixin,
    WeightSender,
    WeightSyncConfig,
    connect_store,
    open_store,
    weights_checksum,
)
from learner.export import export_weights  # noqa: E402


def load_model(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)


class BenchWorker(WeightReceiverMixin):
    """A rollout worker's weight-holding part: the real HF engine (``HFEngine.load_weights`` applies)."""

    def __init__(self, model_dir: str) -> None:
        from actors.config import EngineConfig
        from actors.engines.hf import HFEngine

        self.engine = HFEngine(EngineConfig(backend="hf", device="cpu", cpu_threads=1), model_path=model_dir)
        self.apply_seconds: list[float] = []
        self.raw_group: BroadcastGroup | None = None
        self.apply = True

    def set_apply(self, apply: bool) -> None:
        self.apply = apply  # False: receive a version without loading it, to time the transport alone

    def load_weights(self, named_tensors, *, version: int) -> None:
        if not self.apply:
            return
        start = time.perf_counter()
        self.engine.load_weights(named_tensors, version=version)
        self.apply_seconds.append(time.perf_counter() - start)

    def checksum(self) -> str:
        return weights_checksum(self.engine.model.state_dict().items())

    def take_apply_seconds(self) -> list[float]:
        out, self.apply_seconds = self.apply_seconds, []
        return out

    # the raw baselines
    def raw_get(self, array: np.ndarray) -> int:
        return int(array.nbytes)  # Ray has mapped the object (zero-copy); nothing more to do

    def join_raw_group(self, address: str, rank: int, world_size: int) -> None:
        store = connect_store(address, world_size=world_size, timeout_s=300)
        self.raw_group = BroadcastGroup(store=store, rank=rank, world_size=world_size, backend="gloo", timeout_s=300)

    def raw_broadcast(self, num_bytes: int) -> int:
        buffer = torch.empty(num_bytes, dtype=torch.uint8)
        self.raw_group.broadcast(buffer)
        return int(buffer.numel())


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleaved(timed_runs: dict, repeats: int) -> dict[str, list[float]]:
    """``repeats`` rounds of every run in turn (so that load from other processes on the machine hits
    each alike), after one warm-up round; each run returns the seconds it measured."""
    for run in timed_runs.values():
        run()
    times = {name: [] for name in timed_runs}
    for _ in range(repeats):
        for name, run in timed_runs.items():
            times[name].append(run())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mib", type=float, default=256.0)
    parser.add_argument("--model-dir", default=None, help="an existing small model directory (else built)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from models.build import RECIPES, build_model

    RANDOM_SMALL = RECIPES["small"].model_copy(update={"warm_start": None})  # weights' values do not matter here

    with tempfile.TemporaryDirectory(dir=REPO / ".tmp") as tmp:
        model_dir = args.model_dir or str(build_model(size="small", out_dir=Path(tmp) / "small", recipe=RANDOM_SMALL))
        policy = load_model(model_dir)
        bucket_bytes = int(args.bucket_mib * 2**20)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            workers = [ray.remote(num_cpus=0)(BenchWorker).remote(model_dir) for _ in range(2)]
            ray.get([w.take_apply_seconds.remote() for w in workers])  # wait until both are up

            version = 0

            def export():
                nonlocal version
                version += 1
                return list(export_weights(policy, version=version, bucket_bytes=bucket_bytes))

            export_s = statistics.median(seconds(export) for _ in range(args.repeats))
            buckets = export()
            num_bytes = sum(b.num_bytes for b in buckets)
            flat = np.random.default_rng(0).integers(0, 255, num_bytes, dtype=np.uint8)

            def raw_object_store():
                ref = ray.put(flat)
                ray.get([w.raw_get.remote(ref) for w in workers])

            store = open_store(host="127.0.0.1", world_size=3, timeout_s=300)
            joins = [w.join_raw_group.remote(f"127.0.0.1:{store.port}", rank, 3) for rank, w in enumerate(workers, 1)]
            raw_group = BroadcastGroup(store=store, rank=0, world_size=3, backend="gloo", timeout_s=300)
            ray.get(joins)
            flat_tensor = torch.from_numpy(flat)

            def raw_broadcast():
                calls = [w.raw_broadcast.remote(num_bytes) for w in workers]
                raw_group.broadcast(flat_tensor)
                ray.get(calls)

            raws = {"object_store": raw_object_store, "broadcast": raw_broadcast}
            expected = weights_checksum(policy.state_dict().items())
            results = {}
            for transport_name, raw in raws.items():
                sender = WeightSender(WeightSyncConfig(transport=transport_name, bucket_bytes=bucket_bytes))
                sender.connect(workers)

                def sync():
                    nonlocal version
                    version += 1
                    for b in buckets:
                        b.version = version  # same bytes, a new version each time (the receivers insist)
                    sender.sync(buckets)

                def sync_without_apply():
                    ray.get([w.set_apply.remote(False) for w in workers])
                    start = time.perf_counter()
                    sync()
                    elapsed = time.perf_counter() - start
                    ray.get([w.set_apply.remote(True) for w in workers])
                    return elapsed

                ray.get([w.take_apply_seconds.remote() for w in workers])
                times = interleaved({"sync": lambda: seconds(sync), "raw": lambda: seconds(raw),
                                     "transport": sync_without_apply}, args.repeats)
                # Each worker's first apply is the warm-up round's: left out, as the other figures leave it out.
                per_worker = ray.get([w.take_apply_seconds.remote() for w in workers])
                applied = [s for worker_seconds in per_worker for s in worker_seconds[1:]]
                med = {name: statistics.median(t) for name, t in times.items()}
                results[transport_name] = {
                    "sync_s": med["sync"], "raw_s": med["raw"],
                    "ratio": statistics.median(a / b for a, b in zip(times["sync"], times["raw"])),
                    "sync_min_s": min(times["sync"]), "raw_min_s": min(times["raw"]),
                    "apply_s": statistics.median(applied),
                    "transport_s": med["transport"],
                    "transport_ratio": statistics.median(a / b for a, b in zip(times["transport"], times["raw"])),
                }
                results[transport_name] = {k: round(v, 4) for k, v in results[transport_name].items()}
                sync()  # applied: the receivers must now hold exactly the policy's weights
                results[transport_name]["identical_weights"] = ray.get(
                    [w.checksum.remote() for w in workers]) == [expected, expected]
        finally:
            ray.shutdown()

    print(json.dumps({
        "model": "small",
        "params": sum(p.numel() for p in policy.parameters()),
        "num_bytes": num_bytes,
        "tensors": sum(len(b.tensors) for b in buckets),
        "buckets": len(buckets),
        "receivers": 2,
        "repeats": args.repeats,
        "export_s": round(export_s, 4),
        "transports": results,
        "target_ratio": 1.5,
    }))


if __name__ == "__main__":
    main()
