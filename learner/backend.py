"""Training backends: the DeepSpeed ZeRO engine (any world size) and a plain torch one (one process).

Both expose the same small surface the ``Learner`` needs:

    module                  the Hugging Face model: attributes, no-grad passes, export (ZeRO-3 hooks gather)
    policy                  what a TRAINING forward is called on (under DeepSpeed it routes the call
                            through engine.forward, whose bookkeeping gradient accumulation needs)
    accumulate(loss)        backward of one micro-batch's share of the GLOBAL loss
    apply() -> grad_norm    clip, optimiser step, lr schedule step (once per global batch)
    lr, all_reduce, all_gather_object, barrier, release_parameters, save_state(dir), load_state(dir)

Loss scaling contract: the Learner normalises each micro-batch loss by the GLOBAL token count, so
the plain sum of all micro-batch losses of all ranks is the loss of the global batch. Gradients must
therefore be SUMMED over micro-batches and ranks. DeepSpeed instead divides by the accumulation
steps (``scale_wrt_gas``, turned off here) and AVERAGES over ranks, so ``accumulate`` multiplies the
loss by the world size to cancel that average. With this contract 1 and N ranks give one update.

DeepSpeed on CPU (``DS_ACCELERATOR=cpu``) uses gloo; the first use JIT-compiles a shm op (~1-2 min,
cached under ``TORCH_EXTENSIONS_DIR``). DeepSpeed's own CPU Adam would compile for another minute,
so the optimiser is always ``torch.optim.AdamW``, handed to ``deepspeed.initialize``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
from pathlib import Path

import torch

from learner.config import LearnerConfig

log = logging.getLogger(__name__)

# Torch pickles of the torch backend inside a checkpoint's state folder. The module state is kept
# too (not only the HF export) because with LoRA the export holds merged weights, not the adapters.
TORCH_MODEL_FILE = "model.pt"
TORCH_OPTIMIZER_FILE = "optimizer.pt"
TORCH_SCHEDULER_FILE = "scheduler.pt"
# DeepSpeed's checkpoint "tag": the sub-folder its per-rank files go to.
DEEPSPEED_TAG = "engine"


def resolve_device(config: LearnerConfig, *, local_rank: int = 0) -> torch.device:
    """The device this rank trains on; "cuda" without a visible GPU is an error, never a fallback."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda requested but torch sees no CUDA GPU")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def uses_bf16(config: LearnerConfig, device: torch.device) -> bool:
    """bf16 "auto" is on for CUDA and off on CPU (CPU bf16 matmuls are slow and DeepSpeed's CPU path is fp32)."""
    if config.bf16 == "auto":
        return device.type == "cuda"
    if config.bf16 and device.type != "cuda":
        raise ValueError("bf16: true needs a CUDA device")
    return bool(config.bf16)


def lr_factor(step: int, *, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimiser step ``step`` (0-based: the first update uses step 0).

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps, so the first update already moves.
    Then, with progress p = (step - warmup_steps) / (max_steps - 1 - warmup_steps) clipped to [0, 1]:
    constant 1; linear 1 - (1 - m) p; cosine m + (1 - m) (1 + cos(pi p)) / 2, where m = min_lr_ratio.
    The last update of a run of max_steps updates (step max_steps - 1) is the one at p = 1, so it uses m.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be constant, linear or cosine, got {schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, config: LearnerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    factor = functools.partial(lr_factor, schedule=config.schedule, warmup_steps=config.warmup_steps,
                               max_steps=config.max_steps, min_lr_ratio=config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, config: LearnerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: the vision tower's at ``vision_lr_scale`` × lr, the rest at lr."""
    vision, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (vision if _is_vision(name) else rest).append(param)
    # Empty groups left out (DeepSpeed drops them too): when only the tower trains (LoRA on its layers alone),
    # the first group, whose lr the backends report, is the tower's.
    groups = [{"params": params, "lr": lr} for params, lr in ((rest, config.lr),
                                                               (vision, config.lr * config.vision_lr_scale)) if params]
    # foreach=False: the same per-tensor arithmetic whatever the grouping, so ZeRO's flat partitions and
    # the plain backend's tensors round identically.
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.adam_eps,
                             weight_decay=config.weight_decay, foreach=False)


def _is_vision(name: str) -> bool:
    return ".visual." in f".{name}"


def deepspeed_config(config: LearnerConfig, *, bf16: bool) -> dict:
    """The DeepSpeed JSON config of this learner (the optimiser and scheduler are passed as objects)."""
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_samples,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.global_batch_samples,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW is not on DeepSpeed's list; it works with ZeRO
        "steps_per_print": 2**31 - 1,  # the Learner reports; silence DeepSpeed's own progress lines
        "wall_clock_breakdown": False,
    }


def free_port() -> int:
    """A TCP port that is free now on every interface of this host (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def init_distributed(*, rank: int, world_size: int, device: torch.device) -> None:
    """Join the torch.distributed group (gloo on CPU, NCCL on CUDA) through DeepSpeed.

    Rendezvous is by environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), set by
    ``deploy.learner_group`` or a launcher. A single rank without them gets a private local port,
    so tests and debugging runs need no launcher.
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"torch.distributed already initialised as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, asked for rank {rank} of {world_size}")
        return
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("LOCAL_RANK", "0" if device.type == "cpu" else str(device.index or 0))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def load_model(config: LearnerConfig, *, dtype: torch.dtype, zero3_config: dict | None = None):
    """The Qwen2.5-VL policy from ``config.model_path``, with freezing, LoRA and checkpointing applied.

    With ``zero3_config`` the weights are loaded straight into ZeRO-3 partitions (transformers'
    ``HfDeepSpeedConfig`` switches ``from_pretrained`` to ``deepspeed.zero.Init``), so no rank ever
    holds the full model. transformers keeps that switch in a module global; it is removed again
    right after loading so that models built later in this process are ordinary ones.
    """
    from transformers import AutoModelForImageTextToText

    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        switch = HfDeepSpeedConfig(zero3_config)  # noqa: F841 (transformers holds a weak reference to it)
        try:
            model = AutoModelForImageTextToText.from_pretrained(config.model_path, dtype=dtype)
        finally:
            unset_hf_deepspeed_config()
    else:
        model = AutoModelForImageTextToText.from_pretrained(config.model_path, dtype=dtype)

    if config.lora is not None:
        model = _apply_lora(model, config)
    if config.freeze_vision:
        for name, param in model.named_parameters():
            if _is_vision(name):
                param.requires_grad_(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("no trainable parameters (check freeze_vision and lora.targets)")
    return model


def _apply_lora(model, config: LearnerConfig):
    try:
        import peft
    except ImportError as error:
        raise ImportError("lora: needs the 'peft' package (pip install 'refocus[lora]')") from error
    spec = config.lora
    lora = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                           target_modules=list(spec.targets), bias="none")
    model = peft.get_peft_model(model, lora)
    _check_lora_layers(model)
    return model


def _check_lora_layers(model) -> None:
    """The weight export merges W + scaling·B·A into Linear layers whose weight is their own: refuse adapters it
    would drop or misread (a tied lm_head, exported as the bare embedding it shares; an Embedding or the vision
    tower's Conv3d patch_embed.proj, which a "proj" suffix also matches), before any step trains them."""
    from peft.tuners.lora import LoraLayer

    embedding = model.get_input_embeddings().weight
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        where = name.removeprefix("base_model.model.")
        if type(base) is not torch.nn.Linear:
            raise ValueError(f"learner.lora.targets: {where} is a {type(base).__name__}; adapters go on Linear layers "
                             "only (the weight export merges them there)")
        if base.weight is embedding:
            raise ValueError(f"learner.lora.targets: {where} shares its weight with the input embedding "
                             "(tie_word_embeddings), so a merged adapter cannot be exported; leave it out")


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class EngineForward:
    """The HF model as ``learner.forward`` sees it, with ``model(...)`` routed through ``engine.forward``.

    ZeRO-3 keeps gradient-accumulation state in engine.forward: it advances the optimiser's micro-step
    counter and hooks the output so backward runs DeepSpeed's prologue. Calling ``engine.module``
    directly skips both, and every micro-batch's gradient then REPLACES the previous one instead of
    adding to it (measured: grad norm 0.69 instead of 2.25 with 4 micro-batches). Attribute reads
    (``config``, ``get_image_features``) go to the module; the vision features computed through it
    are part of the graph the routed call consumes, so their backward is covered too.
    """

    def __init__(self, engine):
        self._engine = engine

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._engine.module, name)


class DeepSpeedBackend:
    """A DeepSpeed engine (ZeRO stage from the config) with torch AdamW and a LambdaLR schedule."""

    def __init__(self, config: LearnerConfig, *, rank: int, world_size: int):
        import warnings

        import deepspeed

        # DeepSpeed's ZeRO-3 calls these deprecated torch.distributed names on every step; the warning
        # would print a line per step per rank and bury the progress lines.
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
        if world_size != config.world_size:
            raise ValueError(f"world_size {world_size} differs from config.world_size {config.world_size}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device = resolve_device(config, local_rank=int(os.environ.get("LOCAL_RANK", rank)))
        self.bf16 = uses_bf16(config, self.device)
        init_distributed(rank=rank, world_size=world_size, device=self.device)
        ds_config = deepspeed_config(config, bf16=self.bf16)
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        zero3 = ds_config if config.zero_stage == 3 else None
        model = load_model(config, dtype=dtype, zero3_config=zero3)
        optimizer = make_optimizer(model, config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=lambda opt: make_scheduler(opt, config), config=ds_config)
        self.module = self.engine.module
        self.policy = EngineForward(self.engine)
        self.reference = self._reference_model(ds_config, dtype) if config.kl_coef > 0 else None
        self._grad_norm: float | None = None  # ZeRO-0 float32: the pre-clip norm DeepSpeed does not keep

    def _reference_model(self, ds_config: dict, dtype: torch.dtype):
        """The frozen initial policy for the KL term, partitioned like the policy (no optimiser)."""
        import deepspeed

        ref_config = self.config.model_copy(update={"lora": None, "freeze_vision": False, "gradient_checkpointing": False})
        inference_config = {k: v for k, v in ds_config.items() if k != "gradient_clipping"}
        if self.config.zero_stage in (1, 2):  # they partition optimiser state, and DeepSpeed wants an optimiser
            inference_config["zero_optimization"] = {**ds_config.get("zero_optimization", {}), "stage": 0}
        model = load_model(ref_config, dtype=dtype, zero3_config=inference_config if self.config.zero_stage == 3 else None)
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=inference_config)
        engine.module.eval()
        return engine.module

    def compute(self):
        """The context every forward runs in: none (under bf16 the engine holds bf16 weights, fp32 masters apart)."""
        return contextlib.nullcontext()

    def release_parameters(self) -> None:
        """Wait for and release every gathered or prefetched ZeRO-3 parameter.

        Forward-only passes (generation above all) can end with parameters still being prefetched;
        ``GatheredParameters`` (export, checkpoint) then fails with "Cannot partition a param in flight".
        Calls the ZeRO-3 optimiser directly: ``engine.empty_partition_cache()`` adds a full
        ``gc.collect()`` (measured 0.29 s per call, 15× the export of the 10M-parameter model itself).
        """
        release = getattr(self.engine.optimizer, "empty_partition_cache", None)  # ZeRO-3 only
        if release is not None:
            release()

    def accumulate(self, loss: torch.Tensor) -> None:
        # × world_size cancels DeepSpeed's average over ranks (see the module docstring); DeepSpeed's
        # engine.step() only updates on the accumulation boundary, so it is called every micro-batch.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if self.config.zero_stage == 0 and not self.bf16 and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed clips float32 ZeRO-0 gradients without keeping their norm: take it here, reduced
            # over the ranks already (backward all-reduces on the boundary), before the step clips it.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            self._grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()

    def apply(self) -> float:
        if not self.engine.was_step_applied():
            raise RuntimeError("the optimiser step was not applied: micro-batches per step differ from "
                               f"gradient_accumulation_steps ({self.config.gradient_accumulation_steps})")
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._grad_norm
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def all_reduce(self, values: torch.Tensor, *, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        out = values.detach().to(self.device, torch.float64 if self.device.type == "cpu" else torch.float32).clone()
        dist.all_reduce(out, op=reduce_op)
        return out.cpu().to(torch.float64)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def all_gather_object(self, value) -> list:
        """Every rank's ``value`` (a small picklable object), in rank order."""
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def save_state(self, directory: Path) -> None:
        """Optimiser, scheduler and fp32 master partitions: every rank writes its own files (collective)."""
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory}/{DEEPSPEED_TAG}")


class TorchBackend:
    """One process, no DeepSpeed: for debugging and as an independent reference in tests."""

    def __init__(self, config: LearnerConfig, *, rank: int = 0, world_size: int = 1):
        if world_size != 1 or rank != 0:
            raise ValueError("the torch backend runs a single rank")
        self.config, self.rank, self.world_size = config, 0, 1
        self.device = resolve_device(config)
        self.bf16 = uses_bf16(config, self.device)
        # bf16 compute over float32 weights and optimiser state, as DeepSpeed's bf16 keeps fp32 masters: AdamW on
        # bf16 weights rounded most updates away (at lr 1e-6, 98 % of the weights never moved).
        self.module = load_model(config, dtype=torch.float32).to(self.device)
        self.policy = self.module
        self.optimizer = make_optimizer(self.module, config)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.reference = None
        if config.kl_coef > 0:
            ref_config = config.model_copy(update={"lora": None, "freeze_vision": False, "gradient_checkpointing": False})
            dtype = torch.bfloat16 if self.bf16 else torch.float32  # never trained: no master weights needed
            self.reference = load_model(ref_config, dtype=dtype).to(self.device).eval().requires_grad_(False)

    def compute(self):
        """The context every forward runs in: bf16 autocast over the float32 weights when bf16 is on."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def release_parameters(self) -> None:
        return None  # nothing is partitioned

    def accumulate(self, loss: torch.Tensor) -> None:
        loss.backward()

    def apply(self) -> float:
        params = trainable_parameters(self.module)
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def all_reduce(self, values: torch.Tensor, *, op: str = "sum") -> torch.Tensor:
        if op not in ("sum", "max"):
            raise ValueError(f"op must be sum or max, got {op!r}")
        return values.detach().cpu().to(torch.float64).clone()

    def barrier(self) -> None:
        return None

    def all_gather_object(self, value) -> list:
        return [value]

    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), directory / TORCH_MODEL_FILE)
        torch.save(self.optimizer.state_dict(), directory / TORCH_OPTIMIZER_FILE)
        torch.save(self.scheduler.state_dict(), directory / TORCH_SCHEDULER_FILE)

    def load_state(self, directory: Path) -> None:
        self.module.load_state_dict(torch.load(directory / TORCH_MODEL_FILE, map_location=self.device), strict=True)
        self.optimizer.load_state_dict(torch.load(directory / TORCH_OPTIMIZER_FILE, map_location=self.device))
        self.scheduler.load_state_dict(torch.load(directory / TORCH_SCHEDULER_FILE))


def build_backend(config: LearnerConfig, *, rank: int, world_size: int) -> DeepSpeedBackend | TorchBackend:
    if config.backend == "deepspeed":
        return DeepSpeedBackend(config, rank=rank, world_size=world_size)
    return TorchBackend(config, rank=rank, world_size=world_size)
