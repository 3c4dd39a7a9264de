"""The module every backend wraps (:class:`StepRoot`) and the way back to the model (:func:`unwrap`).

See ``parallelize.py`` for why the root wrapper exists.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class StepRoot(nn.Module):
    """The module DDP / FSDP2 / DeepSpeed wrap: ``forward(fn, *args, **kwargs)`` returns
    ``fn(self.model, *args, **kwargs)``, so one micro-batch's whole loss computation (however many
    model methods it calls) is one forward of the wrapper."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        return fn(self.model, *args, **kwargs)


def unwrap(model) -> nn.Module:
    """The vlmtrain model inside whatever :func:`parallelize` returned (DDP ``.module``, a
    :class:`DeepSpeedEngine`'s DeepSpeed engine and its ``.module``, then :class:`StepRoot`). Under
    FSDP2 its parameters stay sharded: gather a full state dict with
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict``; under ZeRO-3 use
    :meth:`DeepSpeedEngine.full_state_dict`."""
    if not isinstance(model, nn.Module) and hasattr(model, "engine"):  # a DeepSpeedEngine
        model = model.engine
    while True:
        if isinstance(model, StepRoot):
            return model.model
        inner = getattr(model, "module", None)  # DDP and DeepSpeedEngine keep the wrapped module here
        if not isinstance(inner, nn.Module):
            return model
        model = inner
