"""One learner rank: clip-high GRPO updates of the policy on this rank's shard of each global batch.

A plain class (no Ray): ``deploy.learner_group`` wraps it in Ray actors, one per rank, and calls
every collective method (``step``, ``save_checkpoint``, ``load_checkpoint``, ``export_weights``) on
all ranks at once. In one process it runs as rank 0 of 1.

One step on a global batch of ``global_batch_samples`` trajectories split over ranks::

    tokens   = all-reduce(trained tokens of this rank's shard)        the GLOBAL normaliser
    for micro-batch m of this shard (gradient_accumulation_steps of them):
        logp_m = sequence_logprobs(policy, m)                        current policy, with grad
        loss_m = grpo_loss(logp_m, old_m, A_m, mask_m, num_tokens=tokens)
        backward(loss_m)                                             gradients SUM over m and ranks
    clip, AdamW, lr schedule                                         one update of the global loss

Because every piece is divided by the global count, sum over ranks and micro-batches of loss_m is
the loss of the whole batch, and 1 rank or N ranks produce the same update.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from learner import checkpoint as ckpt
from learner.backend import build_backend
from learner.batch import LearnerBatch
from learner.config import LearnerConfig
from learner.export import DEFAULT_BUCKET_BYTES, WeightBucket, export_weights, greedy_completion, save_hf_directory
from learner.forward import sequence_logprobs
from learner.loss import (APPROX_KL, BEHAVIOUR_WEIGHT_CAPPED, BEHAVIOUR_WEIGHT_MEAN, CLIPFRAC_HIGH, CLIPFRAC_LOW,
                          ENTROPY, LOSS_KL_REF, LOSS_POLICY, LOSS_TOTAL, NUM_TOKENS, RATIO_MAX, RATIO_MEAN, SFT_NLL,
                          grpo_loss, sft_loss)

log = logging.getLogger(__name__)

# Metric names of the learner itself (loss metrics come from learner.loss).
STEP = "learner/step"
GRAD_NORM = "learner/grad_norm"
LR = "learner/lr"
TOKENS = "learner/tokens"
SAMPLES = "learner/samples"
STEP_SECONDS = "learner/step_seconds"
TOKENS_PER_SECOND = "learner/tokens_per_second"

# Loss diagnostics reported as token-weighted means over the global batch (present when configured).
_TOKEN_MEANS = (LOSS_POLICY, CLIPFRAC_LOW, CLIPFRAC_HIGH, APPROX_KL, RATIO_MEAN, ENTROPY, LOSS_KL_REF,
                BEHAVIOUR_WEIGHT_MEAN, BEHAVIOUR_WEIGHT_CAPPED)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Learner:
    """The policy, its optimiser and the GRPO update of one rank."""

    def __init__(self, config: LearnerConfig, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if config.model_path is None:
            raise ValueError("learner.model_path: not set (the driver sets it from the run's model)")
        self.config, self.rank, self.world_size = config, rank, world_size
        cores = config.rank_cpu_cores(rank)
        if cores is not None:  # before the backend starts its thread pools
            available = sorted(os.sched_getaffinity(0))
            if not set(cores) <= set(available):
                raise ValueError(f"learner.cpu_cores: rank {rank} asks for CPUs {cores}, this process may use {available}")
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(len(cores))
            log.info("learner rank %d pinned to CPUs %s", rank, cores)
        seed_everything(config.seed)
        self.backend = build_backend(config, rank=rank, world_size=world_size)
        self.device = self.backend.device
        self.version = 0  # optimiser steps applied: the policy version of the current weights
        log.info("learner rank %d/%d ready on %s (%s, bf16=%s)", rank, world_size, self.device, config.backend,
                 self.backend.bf16)

    @property
    def model(self) -> torch.nn.Module:
        """The Hugging Face policy module (ZeRO-3 partitioned under DeepSpeed)."""
        return self.backend.module

    def describe(self) -> dict:
        params = list(self.model.parameters())
        return {
            "rank": self.rank, "world_size": self.world_size, "device": str(self.device), "version": self.version,
            "parameters": sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
            "trainable_parameters": sum(int(getattr(p, "ds_numel", p.numel())) for p in params if p.requires_grad),
            "cpu_affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        }

    # ---------------------------------------------------------------- training
    def step(self, batch: LearnerBatch) -> dict[str, float]:
        """One optimiser step on this rank's shard of a global batch (collective: all ranks call it).

        Returns global statistics (identical on every rank): the loss of the whole batch, token-weighted
        means of the loss diagnostics, the max ratio, the pre-clip gradient norm, the lr this update
        used, trained tokens and samples, and wall time.
        """
        start = time.perf_counter()
        config = self.config
        # Checked after the all-reduce so that every rank raises together instead of leaving the
        # others waiting in a collective.
        wrong_size = float(batch.num_samples != config.samples_per_rank)
        counts = torch.tensor([batch.num_loss_tokens, batch.num_loss_sequences, batch.num_samples, wrong_size],
                              dtype=torch.float64)
        tokens, sequences, samples, wrong_ranks = self.backend.all_reduce(counts).tolist()
        if wrong_ranks:
            raise ValueError(f"{int(wrong_ranks)} rank(s) got a shard of the wrong size (rank {self.rank}: "
                             f"{batch.num_samples}); each rank trains on global_batch_samples / world_size = "
                             f"{config.samples_per_rank}")
        if tokens == 0:
            raise ValueError("the global batch has no trained tokens (every completion_mask is 0)")
        micro = [m.to(self.device) for m in batch.micro_batches(config.micro_batch_samples)]
        old, refs = self._old_and_reference_logprobs(micro)
        lr = self.backend.lr  # the lr of this update (the scheduler advances after it)

        self.model.train()
        sums: dict[str, float] = {}  # loss: plain sum; diagnostics: mean × tokens (token-weighted)
        ratio_max = 0.0
        for m, old_m, ref_m in zip(micro, old, refs):
            logprobs, entropy = self._logprobs(self.backend.policy, m, grad=True)
            loss, stats = grpo_loss(
                logprobs, old_m, m.advantages, m.completion_mask,
                eps_low=config.eps_low, eps_high=config.eps_high, kl_coef=config.kl_coef, ref_logprobs=ref_m,
                aggregation=config.aggregation, entropy=entropy,
                # The GLOBAL normaliser: the pieces of all ranks then sum to the loss of the whole batch.
                num_tokens=tokens if config.aggregation == "token" else None,
                num_sequences=sequences if config.aggregation == "sequence" else None,
                # Decoupled PPO: m.old_logprobs are the engine's when old_m are recomputed (learner.loss).
                behaviour_logprobs=m.old_logprobs if config.behaviour_weight_cap is not None else None,
                behaviour_weight_cap=config.behaviour_weight_cap,
            )
            self.backend.accumulate(loss)
            micro_tokens = float(stats[NUM_TOKENS])
            sums[LOSS_TOTAL] = sums.get(LOSS_TOTAL, 0.0) + float(stats[LOSS_TOTAL])
            for name in _TOKEN_MEANS:
                if name in stats:
                    sums[name] = sums.get(name, 0.0) + float(stats[name]) * micro_tokens
            if micro_tokens > 0:
                ratio_max = max(ratio_max, float(stats[RATIO_MAX]))
        grad_norm = self.backend.apply()
        self.version += 1

        names = sorted(sums)  # the same on every rank: the config decides which diagnostics exist
        totals = self.backend.all_reduce(torch.tensor([sums[name] for name in names], dtype=torch.float64)).tolist()
        result = {name: total if name == LOSS_TOTAL else total / tokens for name, total in zip(names, totals)}
        seconds = time.perf_counter() - start
        result.update({
            RATIO_MAX: float(self.backend.all_reduce(torch.tensor([ratio_max], dtype=torch.float64), op="max")[0]),
            STEP: float(self.version), GRAD_NORM: grad_norm, LR: lr, TOKENS: tokens, SAMPLES: samples,
            STEP_SECONDS: seconds, TOKENS_PER_SECOND: tokens / seconds,
        })
        return result

    def sft_step(self, batch: LearnerBatch) -> dict[str, float]:
        """One supervised optimiser step: cross-entropy on the batch's ``completion_mask`` tokens (collective).

        The same backend, micro-batching, global token normaliser and schedule as ``step``; advantages
        and old log-probs are ignored. Returns the global mean NLL per token, grad norm, lr, tokens,
        samples and wall time.
        """
        start = time.perf_counter()
        counts = torch.tensor([batch.num_loss_tokens, batch.num_samples], dtype=torch.float64)
        tokens, samples = self.backend.all_reduce(counts).tolist()
        if tokens == 0:
            raise ValueError("the global batch has no trained tokens (every completion_mask is 0)")
        lr = self.backend.lr
        self.model.train()
        nll_sum = 0.0
        for m in batch.micro_batches(self.config.micro_batch_samples):
            m = m.to(self.device)
            # Cross-entropy on the model's own distribution, whatever temperature RL samples at.
            logprobs, _ = self._logprobs(self.backend.policy, m, grad=True, temperature=1.0)
            loss, stats = sft_loss(logprobs, m.completion_mask, num_tokens=tokens)
            self.backend.accumulate(loss)
            nll_sum += float(stats[SFT_NLL]) * float(stats[NUM_TOKENS])
        grad_norm = self.backend.apply()
        self.version += 1
        nll = float(self.backend.all_reduce(torch.tensor([nll_sum], dtype=torch.float64))[0]) / tokens
        seconds = time.perf_counter() - start
        return {SFT_NLL: nll, LOSS_TOTAL: nll, STEP: float(self.version), GRAD_NORM: grad_norm, LR: lr,
                TOKENS: tokens, SAMPLES: samples, STEP_SECONDS: seconds, TOKENS_PER_SECOND: tokens / seconds}

    def _old_and_reference_logprobs(self, micro: list[LearnerBatch]) -> tuple[list, list]:
        """Per micro-batch: the ratio's denominator and (with KL) the reference policy's log-probs."""
        old = [m.old_logprobs for m in micro]
        self.model.eval()  # no dropout (LoRA's): a recompute must score as the weights do, not a random mask
        if self.config.old_logprobs == "recompute":
            old = [self._logprobs(self.model, m, grad=False)[0] for m in micro]
        refs = [None] * len(micro)
        if self.backend.reference is not None:
            refs = [self._logprobs(self.backend.reference, m, grad=False)[0] for m in micro]
        return old, refs

    def _logprobs(self, model, micro: LearnerBatch, *, grad: bool, temperature: float | None = None):
        """Log-probs (and entropy) of ``micro`` at ``temperature``; None: RL's, ``config.temperature``."""
        temperature = self.config.temperature if temperature is None else temperature
        with torch.set_grad_enabled(grad), self.backend.compute():
            return sequence_logprobs(model, micro, encode_images_once_per_group=self.config.encode_images_once_per_group,
                                     with_entropy=grad and self.config.log_entropy, temperature=temperature)

    def logprobs(self, batch: LearnerBatch) -> torch.Tensor:
        """[B, L] log-probs of ``batch`` under the current policy at ``config.temperature`` (the scale of the
        engines' behaviour log-probs), no gradient (collective under ZeRO-3)."""
        micro = [m.to(self.device) for m in batch.micro_batches(self.config.micro_batch_samples)]
        length = batch.input_ids.shape[1]
        rows = []
        self.model.eval()
        for m in micro:
            values = self._logprobs(self.model, m, grad=False)[0].cpu()
            rows.append(torch.nn.functional.pad(values, (0, length - values.shape[1])))
        self.backend.release_parameters()
        return torch.cat(rows)

    # ---------------------------------------------------------------- weights
    def export_weights(self, *, version: int | None = None,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[WeightBucket]:
        """Full weights as buckets on rank 0 (collective: exhaust it on every rank)."""
        self.backend.release_parameters()
        yield from export_weights(self.model, version=self.version if version is None else version,
                              bucket_bytes=bucket_bytes)

    def save_pretrained(self, out_dir: str | Path) -> str:
        """Write the current policy as a Hugging Face model directory (collective; rank 0 writes).

        Loadable by transformers' Auto classes and by vLLM; tokenizer and processor files come from
        ``config.model_path``.
        """
        out = Path(out_dir).resolve()
        self._check_same_on_all_ranks("output directory", str(out))
        self.backend.release_parameters()
        save_hf_directory(self.model, source_dir=self.config.model_path, out_dir=out)
        self.backend.barrier()
        return str(out)

    def greedy_completion(self, inputs: dict, *, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation ids of a processor output under the current policy (collective)."""
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with self.backend.compute():
            ids = greedy_completion(self.model, inputs, max_new_tokens=max_new_tokens)
        self.backend.release_parameters()
        return ids

    def save_checkpoint(self, root: str | Path, *, extra_state: dict | None = None) -> str:
        """Write ``<root>/step_<version>`` atomically (collective); returns its path on every rank."""
        root = Path(root).resolve()
        self._check_same_on_all_ranks("checkpoint root", str(root))
        # Bad input fails on every rank together, before any collective: no rank is left waiting.
        trainer_state = ckpt.trainer_state_json(step=self.version, world_size=self.world_size, extra_state=extra_state)
        tmp = ckpt.tmp_dir(root, self.version)
        final = root / ckpt.step_dir_name(self.version)
        if final.exists() and ckpt.is_complete(final):  # every rank sees the same filesystem
            raise FileExistsError(f"checkpoint {final} already exists")
        if self.rank == 0:
            if tmp.exists():  # left over from a crash while writing this step
                shutil.rmtree(tmp)
            if final.exists():  # a crash between its rename and its COMPLETE marker: resume skipped it
                log.warning("removing the incomplete checkpoint %s before writing step %d again", final, self.version)
                shutil.rmtree(final)
            tmp.mkdir(parents=True)
        self.backend.barrier()
        self.backend.release_parameters()
        self.backend.save_state(tmp / ckpt.STATE_DIR)
        ckpt.save_rng(tmp, rank=self.rank)
        save_hf_directory(self.model, source_dir=self.config.model_path, out_dir=tmp)
        self.backend.barrier()
        if self.rank == 0:
            (tmp / ckpt.TRAINER_STATE_FILE).write_text(trainer_state)
            ckpt.publish(tmp, final)
            log.info("checkpoint written: %s", final)
        self.backend.barrier()
        return str(final)

    def _check_same_on_all_ranks(self, what: str, value: str) -> None:
        """Ranks writing one checkpoint to different places would each produce a broken one."""
        values = self.backend.all_gather_object(value)
        if len(set(values)) != 1:
            raise ValueError(f"{what} differs between ranks: {values}")

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore weights, optimiser, schedule, step and RNG from a complete checkpoint (collective).

        Returns the ``extra_state`` saved with it. The world size must be the one it was saved with
        (ZeRO partitions are per rank).
        """
        path = Path(path).resolve()
        self._check_same_on_all_ranks("checkpoint path", str(path))
        if not ckpt.is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {ckpt.COMPLETE_MARKER} marker)")
        state = ckpt.read_trainer_state(path)
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {path} was written by {state['world_size']} ranks; this group has "
                             f"{self.world_size}")
        self.backend.load_state(path / ckpt.STATE_DIR)
        ckpt.load_rng(path, rank=self.rank)
        self.version = int(state["step"])
        self.backend.barrier()
        log.info("resumed from %s at step %d", path, self.version)
        return state["extra_state"]

