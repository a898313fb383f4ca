"""``LearnerGroup``: the ranks of one data-parallel learner as Ray actors forming a torch.distributed group.

The only place that wraps ``learner.learner.Learner`` with ``ray.remote``. Every method here calls
the same method on ALL ranks at once and waits for all of them: the learner's methods are
collectives (gradient reduce-scatter, parameter gathers, barriers), and a rank left out would hang
the others.

Placement: the ranks are reserved as one placement group, one bundle per rank, before any starts.
``placement_strategy: STRICT_PACK`` (the default) puts them on one node together (a node of the training
machines where the cluster has several), so rollout workers, started beside them, cannot split them; they
meet on 127.0.0.1. ``PACK`` lets a group larger than one node span as few nodes as hold it; they meet at
the IP of the node that holds rank 0. Either way the rendezvous port is chosen by a probe
task in rank 0's bundle, on that node, not on the driver's host (which on a cluster is another machine).
A group that cannot form (a rank fails to start, the wait is interrupted) removes its placement group before
the error reaches the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from actors.types import TrajectoryGroup
from learner.advantages import group_advantages
from learner.backend import free_port
from learner.batch import LearnerBatch, collate
from learner.config import LearnerConfig
from learner.export import DEFAULT_BUCKET_BYTES, WeightBucket
from learner.learner import Learner

log = logging.getLogger(__name__)

PLACEMENT_WAIT_LOG_S = 60.0  # how often a learner group waiting for its node(s) says so


class LearnerGroup:
    """``config.world_size`` Learner actors that step, checkpoint and export together.

    Args:
        config: the learner config (``world_size`` ranks, each reserving ``num_cpus_per_rank`` CPUs and
            ``num_gpus_per_rank`` GPUs from Ray).
        image_processor, pad_token_id: used to collate lists of ``TrajectoryGroup``s; when omitted they
            are read from ``config.model_path`` (the image-only processor where torchvision is missing).
        env_vars: extra environment of every rank (e.g. ``TORCH_EXTENSIONS_DIR``, ``DS_ACCELERATOR``).
    """

    def __init__(self, config: LearnerConfig, *, image_processor=None, pad_token_id: int | None = None,
                 env_vars: dict[str, str] | None = None):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("LearnerGroup needs a running Ray (call ray.init first)")
        self.config = config
        self._image_processor, self._pad_token_id = image_processor, pad_token_id
        self.placement_group = self._reserve(config)
        self.actors = []
        try:
            self._await_reservation(config)
            self._start_ranks(config, env_vars or {})
        except BaseException:
            # A group that does not form (a rank fails to start; Ctrl-C while waiting) gives back what it took:
            # its placement group holds CPUs/GPUs until removed, or is served later while still pending.
            self.shutdown()
            raise
        log.info("learner group of %d ranks ready (%d parameters)", config.world_size, self.ranks[0]["parameters"])

    def _start_ranks(self, config: LearnerConfig, env_vars: dict[str, str]) -> None:
        """One Learner actor per bundle; returns once the process group has formed on every rank."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_class = ray.remote(Learner)
        master_addr, master_port = self._rendezvous_address(config, self.placement_group)
        for rank in range(config.world_size):
            env = {
                "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                "WORLD_SIZE": str(config.world_size),
                # Ray gives each actor only its own GPU(s) (CUDA_VISIBLE_DEVICES), so every rank's device
                # is local 0; on CPU there is one "device" anyway.
                "LOCAL_RANK": "0",
                **env_vars,
            }
            options = dict(num_cpus=config.num_cpus_per_rank, num_gpus=config.num_gpus_per_rank,
                           runtime_env={"env_vars": env},
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               placement_group=self.placement_group, placement_group_bundle_index=rank))
            self.actors.append(actor_class.options(**options).remote(config, rank=rank, world_size=config.world_size))
        # Construction is collective (the process group forms); waiting here surfaces its errors.
        self.ranks = ray.get([actor.describe.remote() for actor in self.actors])

    @staticmethod
    def _bundle(config: LearnerConfig) -> dict[str, float]:
        bundle = {"CPU": config.num_cpus_per_rank}
        if config.num_gpus_per_rank:
            bundle["GPU"] = config.num_gpus_per_rank
        return bundle

    @staticmethod
    def _reserve(config: LearnerConfig):
        """A placement group of one bundle per rank (``config.placement_strategy``), asked of Ray (returns at
        once; tasks and actors scheduled into it wait until it is reserved)."""
        from ray.util.placement_group import placement_group

        bundles = [LearnerGroup._bundle(config) for _ in range(config.world_size)]
        return placement_group(bundles, strategy=config.placement_strategy)

    def _await_reservation(self, config: LearnerConfig) -> None:
        """Wait until Ray has reserved the placement group (on a cluster that may mean an autoscaler starting a
        node), logging what it waits for."""
        import ray

        while not ray.wait([self.placement_group.ready()], timeout=PLACEMENT_WAIT_LOG_S)[0]:
            log.warning("learner group still waiting for %d x %s free (%s; ray status shows what the cluster has)",
                        config.world_size, self._bundle(config), config.placement_strategy)

    @staticmethod
    def _rendezvous_address(config: LearnerConfig, group) -> tuple[str, int]:
        """(MASTER_ADDR, MASTER_PORT): asked of rank 0's node by a task in rank 0's bundle, which it uses
        before rank 0's actor takes the bundle."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        probe = ray.remote(_rank0_address).options(
            num_cpus=config.num_cpus_per_rank, num_gpus=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0))
        return ray.get(probe.remote(loopback=config.placement_strategy == "STRICT_PACK"))

    # ---------------------------------------------------------------- batches
    def _processor_parts(self):
        if self._image_processor is None or self._pad_token_id is None:
            from models.processor import load_processor

            processor = load_processor(self.config.model_path)
            if self._image_processor is None:
                self._image_processor = processor.image_processor
            if self._pad_token_id is None:
                self._pad_token_id = processor.tokenizer.pad_token_id
        return self._image_processor, self._pad_token_id

    def collate(self, groups: list[TrajectoryGroup]) -> LearnerBatch:
        """Advantages from each trajectory's total reward (``config.advantage_scale``), then padded tensors."""
        rewards = [[trajectory.reward for trajectory in group.trajectories] for group in groups]
        advantages = group_advantages(rewards, scale=self.config.advantage_scale, eps=self.config.advantage_eps)
        image_processor, pad_token_id = self._processor_parts()
        return collate(groups, image_processor=image_processor, pad_token_id=pad_token_id, advantages=advantages)

    def split(self, batch: LearnerBatch) -> list[LearnerBatch]:
        """The global batch cut into one contiguous shard of whole samples per rank."""
        if batch.num_samples != self.config.global_batch_samples:
            raise ValueError(f"global batch has {batch.num_samples} samples, config.global_batch_samples is "
                             f"{self.config.global_batch_samples}")
        return batch.split(self.config.world_size)

    # ---------------------------------------------------------------- collectives
    def _all(self, method: str, *args, shards: list | None = None, **kwargs) -> list:
        """Call ``method`` on every rank at once and wait for all; returns the per-rank results.

        Every rank gets the same ``args`` / ``kwargs``; with ``shards`` (one item per rank), rank r
        also gets ``shards[r]`` as its first argument.
        """
        import ray

        if shards is not None and len(shards) != len(self.actors):
            raise ValueError(f"{len(shards)} shards for {len(self.actors)} ranks")
        refs = []
        for rank, actor in enumerate(self.actors):
            rank_args = args if shards is None else (shards[rank], *args)
            refs.append(getattr(actor, method).remote(*rank_args, **kwargs))
        return ray.get(refs)

    def step(self, batch: LearnerBatch | list[TrajectoryGroup]) -> dict[str, float]:
        """One optimiser step on a global batch; returns rank 0's (global) statistics."""
        if not isinstance(batch, LearnerBatch):
            batch = self.collate(batch)
        return self._all("step", shards=self.split(batch))[0]

    def sft_step(self, batch: LearnerBatch) -> dict[str, float]:
        """One supervised (cross-entropy) optimiser step on a global batch; rank 0's global statistics."""
        return self._all("sft_step", shards=self.split(batch))[0]

    def logprobs(self, batch: LearnerBatch) -> torch.Tensor:
        """[B, L] current-policy log-probs of a global batch (each rank scores its shard)."""
        pieces = self._all("logprobs", shards=self.split(batch))
        length = batch.input_ids.shape[1]
        return torch.cat([torch.nn.functional.pad(p, (0, length - p.shape[1])) for p in pieces])

    def save_checkpoint(self, root: str | Path, *, extra_state: dict | None = None) -> str:
        """Atomic checkpoint under ``root`` (see ``learner.checkpoint``); returns its directory."""
        return self._all("save_checkpoint", str(root), extra_state=extra_state)[0]

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore every rank from ``path``; returns the checkpoint's extra_state."""
        return self._all("load_checkpoint", str(path))[0]

    def export_weights(self, *, version: int | None = None,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[WeightBucket]:
        """Stream the full weights from rank 0, bucket by bucket, while every rank takes part in the gathers.

        Each rank runs the export as a Ray streaming generator; rank 0's buckets are fetched as they
        are produced, so this stream holds one bucket at a time. A caller that keeps them holds the whole
        model: ``RolloutFleet.sync`` does, to serve workers that start or restart later.
        """
        import ray

        streams = [actor.export_weights.options(num_returns="streaming").remote(version=version, bucket_bytes=bucket_bytes)
                   for actor in self.actors]
        for ref in streams[0]:
            yield ray.get(ref)
        for stream in streams[1:]:
            for ref in stream:  # other ranks yield nothing; draining surfaces their errors
                ray.get(ref)

    def save_pretrained(self, out_dir: str | Path) -> str:
        """The current policy as a Hugging Face / vLLM model directory (written by rank 0)."""
        return self._all("save_pretrained", str(out_dir))[0]

    def greedy_completion(self, inputs: dict, *, max_new_tokens: int) -> list[list[int]]:
        """The policy's greedy continuation of a processor output (every rank decodes in step)."""
        return self._all("greedy_completion", inputs, max_new_tokens=max_new_tokens)[0]

    def describe(self) -> list[dict]:
        return self._all("describe")

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None


def _rank0_address(*, loopback: bool) -> tuple[str, int]:
    """Runs on rank 0's node: the address the other ranks reach it at (loopback when they share the
    node) and a TCP port free there now."""
    import ray

    return ("127.0.0.1" if loopback else ray.util.get_node_ip_address()), free_port()
