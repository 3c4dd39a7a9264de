"""AdamW with per-part learning rates and freeze flags; linear warmup then cosine decay to a floor."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from vlmtrain.models.parts import model_parts, trainable_counts


def apply_freeze(model: nn.Module, tcfg, also_frozen: Iterable[str] = ()) -> dict[str, int]:
    """Freeze parts per ``train.freeze_*`` and the parts in ``also_frozen`` (those LoRA adapts);
    returns trainable parameter counts per part."""
    frozen = {"vision": tcfg.freeze_vision, "projector": tcfg.freeze_projector, "llm": tcfg.freeze_llm}
    frozen.update({part: True for part in also_frozen})
    for part, params in model_parts(model).items():
        if part not in frozen:  # the spatial branch: its encoder is always frozen, its projector trains
            continue
        for _, p in params:
            p.requires_grad_(not frozen[part])
    return trainable_counts(model)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Norm gains, biases and embedding tables are not regularised toward zero.
    return param.ndim < 2 or "norm" in name or "embed" in name or "frame_age" in name


def build_optimizer(model: nn.Module, ocfg) -> torch.optim.AdamW:
    """AdamW over trainable parameters, one group per (part, decay) with the part's learning rate."""
    rates = {"vision": ocfg.lr_vision, "projector": ocfg.lr_projector, "llm": ocfg.lr_llm, "spatial": ocfg.lr_spatial}
    groups = []
    for part, params in model_parts(model).items():
        lr = rates[part] if rates[part] is not None else ocfg.lr
        for decay in (True, False):
            chosen = [p for n, p in params if p.requires_grad and _no_decay(n, p) != decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": ocfg.weight_decay if decay else 0.0,
                               "name": f"{part}/{'decay' if decay else 'no_decay'}"})
    if not groups:
        raise ValueError("every part is frozen: nothing to train")
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, betas=(ocfg.beta1, ocfg.beta2), eps=ocfg.eps, fused=can_fuse(params))


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: plain floating tensors on CPU or CUDA
    (one kernel per step instead of one per tensor: 2.4 ms instead of 6.8 ms for 5.3 M CPU parameters).
    FSDP2's sharded parameters (DTensor) keep the default implementation."""
    return all(type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
               for p in params)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak rate at ``step``: linear warmup, then cosine from 1 to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, ocfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying :func:`lr_factor` to every group's own peak rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, ocfg.warmup_steps, total_steps, ocfg.min_lr_ratio)
    )
