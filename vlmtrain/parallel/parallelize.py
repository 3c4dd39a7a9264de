"""Data parallelism applied from outside the model: DDP, FSDP2 (``fully_shard``) or DeepSpeed ZeRO.

Model files never import ``torch.distributed``; everything here works on any vlmtrain model (the
composed VLM and every HF adapter) without changing it.

**Why a root wrapper.** vlmtrain models are driven through three methods (``encode_images``,
``embed``, ``forward_lm``), never through ``forward``. DDP only prepares its gradient reducer inside
``DDP.forward``, and FSDP2 only all-gathers the root's parameters (embeddings, projector, LM head)
in the root's forward hook; calling the methods directly would skip both (no gradient sync, or
sharded parameters inside the math). So :func:`parallelize` wraps the model in :class:`StepRoot`,
whose ``forward(fn, *args)`` runs ``fn(model, *args)``, and applies the backend to that root. A
training step computes each micro-batch loss as ``loss = parallel(batch_loss, batch, device)``,
where ``batch_loss(model, batch, device)`` is the same function a single process uses.
:func:`unwrap` gives the model back (saving, evaluation, building the optimizer: build it *after*
``parallelize`` from ``unwrap(parallel).named_parameters()``, because FSDP2 replaces parameters with
sharded ones and part names must not carry the wrapper's prefix).

**Ranks without images.** Every rank must run the same collectives in the same order and produce
gradients for the same parameters; a rank whose micro-batch holds no frame would skip the vision
tower. It encodes one black frame instead and passes those features to ``embed`` with its empty
slot list (:func:`~vlmtrain.features.source.dummy_frame_features`, applied by
``FeatureSource.features`` to every backend and to one process alike): its graph then has the
shape of a micro-batch with frames, which DDP, FSDP2 and ZeRO-2/3 all need.

**DeepSpeed** (optional extra, imported lazily; ``deepspeed_engine.py``) returns a
:class:`~vlmtrain.parallel.deepspeed_engine.DeepSpeedEngine` around the same root: the step calls
``engine.backward(loss)`` per micro-batch (the same weighted loss as under DDP) and ``engine.step()``
once per optimizer step (clipping, optimizer, scheduler). ZeRO-3 gathers each module's parameters in
that module's forward, so all ranks must run the same modules in the same order (see above).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, ContextManager, Mapping, Optional, Sequence

import torch
from torch import nn

from vlmtrain.config_parallel import ParallelConfig
from vlmtrain.parallel.deepspeed_engine import DeepSpeedEngine, build_engine
from vlmtrain.parallel.init import DistInfo
from vlmtrain.parallel.root import StepRoot, unwrap

__all__ = ["BACKENDS", "DeepSpeedEngine", "StepRoot", "accumulation_context", "parallelize", "transformer_blocks",
           "unwrap"]

from vlmtrain.config_parallel import BACKENDS  # noqa: E402  (re-exported)
PRECISIONS = ("fp32", "bf16")
# ModuleList names that hold repeated transformer blocks in HF models (fallback for non-HF blocks).
BLOCK_LIST_NAMES = ("layers", "layer", "blocks", "h")

log = logging.getLogger(__name__)


# -- finding the blocks --------------------------------------------------------------------------
def _is_block_list(name: str, modules: nn.ModuleList) -> bool:
    """A ModuleList of repeated transformer blocks: every entry is an HF ``GradientCheckpointingLayer``
    (how transformers marks encoder and decoder layers), or, for models that do not use it, the list
    has a conventional block-list name and entries of one class that own parameters."""
    if len(modules) == 0:
        return False
    from transformers.modeling_layers import GradientCheckpointingLayer

    if all(isinstance(m, GradientCheckpointingLayer) for m in modules):
        return True
    same_class = len({type(m) for m in modules}) == 1
    has_params = any(True for _ in modules[0].parameters())
    return name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES and same_class and has_params


def transformer_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The repeated transformer blocks of ``model``, per part (``vision``, ``llm``; ``projector`` if a
    projector had blocks), in forward order. Found by walking the module tree, so the composed
    model (``vision.encoder.layers``, ``lm.model.layers``) and every HF family (Qwen-VL
    ``model.visual.blocks`` / ``model.language_model.layers``, Idefics3, LLaVA) need no table. Lists
    nested inside a found block (e.g. experts) are not blocks of their own."""
    model = unwrap(model)
    found: dict[str, list[nn.Module]] = {}
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(t + ".") for t in taken):
            continue
        if not _is_block_list(name, module):
            continue
        taken.append(name)
        first_param = next(n for n, _ in module[0].named_parameters())
        part = model.part_of(f"{name}.0.{first_param}")
        found.setdefault(part, []).extend(module)
    return found


# -- gradient accumulation ----------------------------------------------------------------------
def accumulation_context(model: nn.Module, is_last_micro: bool) -> ContextManager:
    """``model.no_sync()`` for DDP on every micro-batch but the last of a step (gradients accumulate
    locally and are all-reduced once, in the last backward); a no-op context otherwise. FSDP2 keeps
    reduce-scattering every micro-batch: skipping it would hold unsharded gradients (the memory FSDP
    exists to save)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not is_last_micro:
        return model.no_sync()
    return contextlib.nullcontext()


# -- backends ------------------------------------------------------------------------------------
def _ddp(root: StepRoot, info: DistInfo, find_unused: bool, bucket_cap_mb: Optional[float]) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    root.to(info.device)
    kwargs: dict[str, Any] = {}
    if bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = bucket_cap_mb
    # Transformer buffers (rotary inv_freq, position ids) are constants: re-broadcasting them every
    # forward would only cost time (BatchNorm statistics would need it; none here). They are still
    # synced once at construction. torch 2.13 renamed the switch; older releases know the old name.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return DistributedDataParallel(
        root,
        device_ids=[info.device.index] if info.device.type == "cuda" else None,
        find_unused_parameters=find_unused,
        # Gradients live in the all-reduce buckets: one copy of the gradients instead of two.
        gradient_as_bucket_view=True,
        **kwargs,
    )


def _fsdp2(root: StepRoot, info: DistInfo, mixed_precision: str, reshard_after_forward: bool,
           shard_parts: Sequence[str], reduce_dtype: str = "fp32") -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    # bf16 compute, fp32 gradient reduction by default: summing many ranks' gradients in bf16 loses bits.
    reduce = torch.bfloat16 if reduce_dtype == "bf16" else torch.float32
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
          if mixed_precision == "bf16" else MixedPrecisionPolicy())
    # No root.to(device) first: fully_shard moves each module's states as it shards them, so the
    # whole unsharded model never has to fit on one GPU.
    sharded = 0
    for part, blocks in transformer_blocks(root.model).items():
        if part not in shard_parts:
            continue
        for block in blocks:
            # One all-gather per block just before it runs, freed after it (reshard_after_forward)
            # and gathered again in backward: peak memory is one block's full weights.
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
            sharded += 1
    if sharded == 0:
        log.warning("fsdp2: no transformer blocks found in %s; the whole model is one shard group",
                    type(root.model).__name__)
    # The root groups everything else (embeddings, projector, norms, LM head).
    fully_shard(root, mesh=mesh, mp_policy=mp)
    return root


def parallelize(
    model: nn.Module,
    pcfg: ParallelConfig,
    info: DistInfo,
    *,
    precision: str = "fp32",
    cached_features: bool = False,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    deepspeed: Optional[Mapping[str, Any]] = None,
    extensions_dir: Optional[str] = None,
) -> nn.Module | DeepSpeedEngine:
    """``model`` (moved to ``info.device``) inside a :class:`StepRoot`, wrapped by ``pcfg.backend``.

    - ``none``: the root only (one process, same call shape as the others);
    - ``ddp``: ``DistributedDataParallel`` (``ddp_bucket_cap_mb``; unused parameters are looked for
      when ``ddp_find_unused`` or when the model has trainable parameters no loss reaches); use
      :func:`accumulation_context` for micro-batches;
    - ``fsdp2``: ``fully_shard`` per transformer block of the parts in ``fsdp_shard_parts`` (see
      :func:`transformer_blocks`), then the root. ``fsdp_mixed_precision`` (auto: bf16 on CUDA, fp32
      on CPU, where bf16 is slow and inexact) keeps fp32 sharded parameters and computes in bf16
      with ``fsdp_reduce_dtype`` gradient reduction. With ``cached_features`` the vision blocks are
      not sharded on their own: a rank whose frames all hit the cache skips the encoder, and its
      per-block all-gathers would pair with another rank's LM blocks; in the root group they are
      gathered with the root, on every rank;
    - ``deepspeed``: a :class:`DeepSpeedEngine` for ``deepspeed`` (a config from
      :func:`~vlmtrain.parallel.deepspeed_engine.deepspeed_config_from`), ``optimizer`` and
      ``scheduler``; ``extensions_dir`` holds DeepSpeed's JIT-compiled ops. ``precision`` (the
      run's ``train.precision``) must agree with the config's bf16 setting.

    A backend other than ``none`` without a process group (no torchrun) falls back to ``none`` with
    a log line, so one config runs on 1 or N GPUs; ``deepspeed`` needs the process group (torchrun,
    also for one process).
    """
    backend = pcfg.backend
    if backend not in BACKENDS:
        raise ValueError(f"parallelize: backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"parallelize: precision must be one of {PRECISIONS}, got {precision!r}")
    root = StepRoot(model)
    if backend == "none" or (backend in ("ddp", "fsdp2") and not info.distributed):
        if backend != "none":
            log.info("parallelize: no process group (not started by torchrun): %s not applied", backend)
        return root.to(info.device)
    if backend == "ddp":
        unreachable = model.unreachable_trainable()
        if unreachable and not pcfg.ddp_find_unused:
            log.info("ddp: find_unused_parameters on: %d trainable parameters can never get a gradient (e.g. %s)",
                     len(unreachable), unreachable[0])
        return _ddp(root, info, pcfg.ddp_find_unused or bool(unreachable), pcfg.ddp_bucket_cap_mb)
    if backend == "fsdp2":
        mixed = pcfg.fsdp_mixed_precision
        if mixed == "auto":
            mixed = "bf16" if info.device.type == "cuda" else "fp32"
        parts = [p for p in pcfg.fsdp_shard_parts if not (cached_features and p == "vision")]
        return _fsdp2(root, info, mixed, pcfg.fsdp_reshard_after_forward, parts, pcfg.fsdp_reduce_dtype)
    if deepspeed is None:
        raise ValueError("backend 'deepspeed' needs deepspeed=deepspeed_config_from(...)")
    if bool(deepspeed.get("bf16", {}).get("enabled", False)) != (precision == "bf16"):
        raise ValueError(f"parallelize: precision={precision!r} disagrees with the DeepSpeed "
                         f"config's bf16.enabled={deepspeed.get('bf16', {}).get('enabled', False)}")
    if optimizer is None:
        raise ValueError("backend 'deepspeed': pass optimizer= (built over the model's parameters)")
    return build_engine(root, optimizer, deepspeed, scheduler=scheduler, extensions_dir=extensions_dir)
