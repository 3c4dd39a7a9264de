"""DeepSpeed ZeRO stage 2 / 3 (optional extra): the config dict and a thin engine wrapper.

:func:`deepspeed_config` turns vlmtrain-level settings into DeepSpeed's config dict (a pure function:
no DeepSpeed needed). :func:`build_engine` wraps a vlmtrain model in :class:`~vlmtrain.parallel.root.StepRoot`
and hands it, with the loop's own torch optimizer (and scheduler), to ``deepspeed.initialize``;
:class:`DeepSpeedEngine` then gives the loop the same shape as a plain step::

    loss = engine(batch_loss, batch, device)        # one micro-batch; StepRoot.forward
    engine.backward(loss * weight)                  # every micro-batch, same weight as under DDP
    grad_norm = engine.step()                       # once per optimizer step: clip, step, zero grads

**Loss weighting.** ``backward`` does *not* divide by the accumulation count (DeepSpeed's default,
``scale_wrt_gas=True``, would); DeepSpeed averages gradients over ranks like DDP. So the loss weighted by its
share of the step's label tokens times ``world_size`` (``train_step``'s weight) gives the gradient
of the whole global batch, however it is split over ranks and micro-batches.

**Accumulation boundary.** DeepSpeed normally counts ``engine.step()`` calls, one per micro-batch.
Here the wrapper tells DeepSpeed before each backward whether it is the step's last micro-batch
(``set_gradient_accumulation_boundary``), so ``step()`` is called once per optimizer step and a step
may hold any number of micro-batches.

**CPU.** DeepSpeed picks its CPU accelerator when CUDA is absent and then uses gloo (oneCCL when
``oneccl_bindings_for_pytorch`` is installed). Its communication backend JIT-compiles a small
shared-memory op on first use (about a minute on 2 cores); :func:`build_engine` points
``TORCH_EXTENSIONS_DIR`` at ``extensions_dir`` (e.g. the run folder) unless the user set it.
A torch optimizer works with ``offload_optimizer="cpu"`` (``zero_force_ds_cpu_optimizer`` is off);
DeepSpeed's faster ``DeepSpeedCPUAdam`` JIT-compiles another op (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from vlmtrain.config_parallel import ParallelConfig
from vlmtrain.parallel.root import StepRoot, unwrap

# DeepSpeed's wall-clock timers, reported as ``deepspeed/<name>_ms`` by DeepSpeedEngine.timings().
TIMERS = ("fwd", "bwd", "bwd_inner", "bwd_allreduce", "step")
CLIENT_KEY = "vlmtrain"  # where save() keeps the loop's client_state inside DeepSpeed's checkpoint


def deepspeed_config(
    *,
    stage: int = 2,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    reduce_bucket_size: int = 500_000_000,
    allgather_bucket_size: int = 500_000_000,
    stage3_prefetch_bucket_size: int = 50_000_000,
    stage3_param_persistence_threshold: int = 100_000,
    overlap_comm: bool = True,
    wall_clock_breakdown: bool = False,
    bf16: bool = True,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    micro_batch_size: int = 1,
) -> dict[str, Any]:
    """A DeepSpeed config dict for ZeRO ``stage`` 2 or 3.

    ``offload_optimizer`` / ``offload_param``: ``none`` or ``cpu`` (parameters can only be offloaded
    with stage 3, which partitions them). Bucket sizes and the persistence threshold count elements;
    ``allgather_bucket_size`` is stage 2's (stage 3 gathers by ``stage3_prefetch_bucket_size``);
    parameters smaller than ``stage3_param_persistence_threshold`` stay whole on every rank.
    ``micro_batch_size`` and ``grad_accum`` are nominal (packed micro-batches vary in samples, and
    :class:`DeepSpeedEngine` marks the accumulation boundary itself): DeepSpeed uses them for its
    sample counter and throughput log. ``grad_clip`` 0 disables clipping, as in vlmtrain.
    ``wall_clock_breakdown`` times forward / backward / all-reduce / step (:meth:`DeepSpeedEngine.timings`).
    """
    if stage not in (2, 3):
        raise ValueError(f"deepspeed_config: stage must be 2 or 3, got {stage}")
    for name, value in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if value not in ("none", "cpu"):
            raise ValueError(f"deepspeed_config: {name} must be 'none' or 'cpu', got {value!r}")
    if offload_param == "cpu" and stage != 3:
        raise ValueError("deepspeed_config: offload_param='cpu' needs stage 3 (stage 2 does not partition parameters)")
    for name, value in (("reduce_bucket_size", reduce_bucket_size), ("allgather_bucket_size", allgather_bucket_size),
                        ("grad_accum", grad_accum), ("micro_batch_size", micro_batch_size),
                        ("stage3_prefetch_bucket_size", stage3_prefetch_bucket_size)):
        if int(value) <= 0:
            raise ValueError(f"deepspeed_config: {name} must be positive, got {value}")
    if stage3_param_persistence_threshold < 0 or grad_clip < 0:
        raise ValueError("deepspeed_config: stage3_param_persistence_threshold and grad_clip must be >= 0")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": overlap_comm,  # reduce gradients while backward still runs
        "contiguous_gradients": True,  # copy gradients into one buffer as produced: less fragmentation
        "reduce_scatter": True,
        "reduce_bucket_size": int(reduce_bucket_size),
    }
    if stage == 2:
        zero["allgather_bucket_size"] = int(allgather_bucket_size)
    else:
        zero["stage3_prefetch_bucket_size"] = int(stage3_prefetch_bucket_size)
        zero["stage3_param_persistence_threshold"] = int(stage3_param_persistence_threshold)
        # save_16bit_model / export then writes whole weights instead of per-rank partitions.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    pin = torch.cuda.is_available()  # pinned host memory speeds up GPU copies; nothing to pin for on CPU
    if offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum),
        "gradient_clipping": float(grad_clip),
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # The loop's torch AdamW also runs offloaded (slower than DeepSpeedCPUAdam, but no compiled op).
        "zero_force_ds_cpu_optimizer": False,
        "wall_clock_breakdown": bool(wall_clock_breakdown),
        # vlmtrain logs its own metrics; DeepSpeed would print a line every 10 steps.
        "steps_per_print": 2**31 - 1,
    }


def deepspeed_config_from(pcfg: ParallelConfig, *, bf16: bool, grad_accum: int, grad_clip: float,
                          micro_batch_size: int) -> dict[str, Any]:
    """:func:`deepspeed_config` from the ``parallel.deepspeed_*`` keys (``deepspeed_zero_stage`` is
    ``stage``, every other key drops its prefix) and the run's precision, accumulation and clipping."""
    keys = {f.name[len("deepspeed_"):]: getattr(pcfg, f.name) for f in dataclasses.fields(pcfg)
            if f.name.startswith("deepspeed_")}
    keys["stage"] = keys.pop("zero_stage")
    return deepspeed_config(**keys, bf16=bf16, grad_accum=grad_accum, grad_clip=grad_clip,
                            micro_batch_size=micro_batch_size)


class DeepSpeedEngine:
    """A DeepSpeed engine driven like a plain model and optimizer (see the module docstring)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._micro = 0  # backward calls since the last step()

    @property
    def model(self) -> nn.Module:
        """The vlmtrain model (its parameters are partitioned under stage 3: see :meth:`full_state_dict`)."""
        return unwrap(self.engine)

    def train(self, mode: bool = True) -> "DeepSpeedEngine":
        """Training (or eval) mode of the engine and the model inside, like ``nn.Module.train``."""
        self.engine.train(mode)
        return self

    def __call__(self, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``fn(model, *args, **kwargs)`` through the engine's forward (stage 3 gathers parameters in it)."""
        return self.engine(fn, *args, **kwargs)

    def backward(self, loss: torch.Tensor, last_micro: Optional[bool] = None) -> None:
        """Backward of one micro-batch's weighted loss (not divided by the accumulation count).
        ``last_micro`` (default: this is micro-batch ``gradient_accumulation_steps`` of the step)
        tells DeepSpeed to finish the step's gradient reduction in this backward."""
        if last_micro is None:
            last_micro = self._micro + 1 >= self.engine.gradient_accumulation_steps()
        self.engine.set_gradient_accumulation_boundary(bool(last_micro))
        self.engine.backward(loss, scale_wrt_gas=False)
        self._micro += 1

    def step(self) -> float:
        """Clip (``gradient_clipping``), step the optimizer and the scheduler given to
        :func:`build_engine`, zero the gradients; returns the global gradient norm before clipping."""
        if self._micro == 0:
            raise RuntimeError("DeepSpeedEngine.step: no backward since the last step")
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def timings(self) -> dict[str, float]:
        """Milliseconds of the last step per DeepSpeed phase (``deepspeed/fwd_ms``, ``deepspeed/bwd_ms``,
        ``deepspeed/bwd_allreduce_ms``, ...): empty unless ``wall_clock_breakdown`` is on."""
        get = getattr(self.engine, "get_wall_clock_timers", None)  # absent in older DeepSpeed releases
        cache = (get() if get else None) or {}
        return {f"deepspeed/{name}_ms": float(cache[name]) for name in TIMERS if name in cache}

    def save(self, directory: str | Path, client_state: Optional[Mapping[str, Any]] = None,
             tag: Optional[str] = None) -> Path:
        """Collective: every rank writes its partitions of weights and optimizer state (and the
        scheduler's state) under ``directory/tag`` (default ``global_step<N>``) and ``latest`` names
        the tag. ``client_state`` (step, data position, RNG) comes back from :meth:`load`."""
        tag = tag or f"global_step{self.engine.global_steps}"  # DeepSpeed's default, named here
        # Under one key: DeepSpeed returns its own bookkeeping (shapes, config) mixed into client_state.
        self.engine.save_checkpoint(str(directory), tag=tag, client_state={CLIENT_KEY: dict(client_state or {})})
        return Path(directory) / tag

    def load(self, directory: str | Path, tag: Optional[str] = None) -> dict[str, Any]:
        """Collective: restore weights, optimizer and scheduler state from ``directory`` (the tag in
        ``latest`` unless ``tag``); returns the ``client_state`` given to :meth:`save`. The world size
        must be the one that saved (DeepSpeed's ``zero_to_fp32.py`` converts to whole weights)."""
        path, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeedEngine.load: no DeepSpeed checkpoint in {directory} (tag {tag})")
        self._micro = 0
        return dict((client_state or {}).get(CLIENT_KEY, {}))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: whole weights of the model (gathered from all ranks under stage 3) as CPU fp32
        copies on every rank, for evaluation, export and tests. With bf16 these are the bf16 model
        weights upcast (the fp32 master copy lives in the optimizer's partitions)."""
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Mapping[str, Any],
    *,
    scheduler: Optional[Any] = None,
    extensions_dir: Optional[str | Path] = None,
) -> DeepSpeedEngine:
    """``model`` inside a :class:`~vlmtrain.parallel.root.StepRoot`, with ``optimizer`` (built over
    the model's parameters before this call) and ``scheduler`` (stepped by :meth:`DeepSpeedEngine.step`,
    saved in checkpoints), handed to ``deepspeed.initialize`` with ``config`` (:func:`deepspeed_config`).

    Needs the process group started (``init_distributed``; torchrun). ``extensions_dir`` becomes
    ``TORCH_EXTENSIONS_DIR`` (where DeepSpeed JIT-compiles its ops) unless that is already set.
    """
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("backend 'deepspeed' needs DeepSpeed, an optional extra: "
                          "pip install 'vlmtrain[deepspeed]'") from exc
    if not torch.distributed.is_initialized():
        raise RuntimeError("backend 'deepspeed' needs a process group: launch with torchrun (also for one "
                           "process: torchrun --nproc_per_node 1) and call init_distributed() first")
    if extensions_dir is not None and not os.environ.get("TORCH_EXTENSIONS_DIR"):
        Path(extensions_dir).mkdir(parents=True, exist_ok=True)
        os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir)
    root = model if isinstance(model, StepRoot) else StepRoot(model)
    # dist_init_required=False: init_distributed() already started the group torchrun described.
    engine, _, _, _ = deepspeed.initialize(model=root, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=dict(config), dist_init_required=False)
    return DeepSpeedEngine(engine)
