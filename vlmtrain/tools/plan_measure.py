"""Measured counterparts of ``vlmtrain plan``'s estimates: what autograd really saves in a forward, and
the bytes a rank really holds in parameters, gradients and optimizer state.

``tests/tools/test_plan.py`` holds the plan's analytic numbers against these; they are also a quick way
to look at a real model (``saved_activations(model, fn)``).

**What counts as an activation.** Every tensor autograd saves for backward during the forward
(``torch.autograd.graph.saved_tensors_hooks``), counted once per storage (by the storage's
``data_ptr``, with the storage's full ``nbytes``: a view saved for backward keeps its whole base
alive). Storages of the model's parameters and buffers are *not* activations (a frozen linear layer
saves its weight; that memory is the parameters'), so they are left out. Tensors kept alive some
other way (non-reentrant activation checkpointing keeps each checkpointed layer's inputs in a closure,
not through the hooks) are invisible to the hooks; :func:`checkpointed_inputs` counts those.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass
class SavedTensors:
    """Bytes of the unique storages autograd saved, in total and by the innermost module that saved them."""

    total: int = 0
    by_module: dict[str, int] = field(default_factory=dict)
    storages: dict[int, int] = field(default_factory=dict)  # data_ptr -> nbytes
    entries: list[tuple[str, tuple[int, ...], str, int]] = field(default_factory=list)  # (module, shape, dtype, bytes)
    savers: dict[int, set[str]] = field(default_factory=dict)  # data_ptr -> every module that saved it


@contextlib.contextmanager
def saved_tensors_meter(model: nn.Module) -> Iterator[SavedTensors]:
    """Within this context, record every tensor autograd saves (see the module docstring) in the yielded
    :class:`SavedTensors`, attributing it to the innermost module running at the time."""
    state = {_ptr(t) for t in (*model.parameters(), *model.buffers()) if t.numel()}
    out = SavedTensors()
    stack: list[str] = [""]
    handles = []

    def enter(name: str) -> Callable:
        def hook(module, args) -> None:
            stack.append(name)
        return hook

    def leave(module, args, output) -> None:  # returns None: the output stays as it is
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and t.numel():
            ptr = _ptr(t)
            if ptr not in state:
                out.savers.setdefault(ptr, set()).add(stack[-1])
            if ptr not in state and ptr not in out.storages:
                nbytes = t.untyped_storage().nbytes()
                out.storages[ptr] = nbytes
                out.total += nbytes
                out.by_module[stack[-1]] = out.by_module.get(stack[-1], 0) + nbytes
                out.entries.append((stack[-1], tuple(t.shape), str(t.dtype).replace("torch.", ""), nbytes))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield out
    finally:
        for h in handles:
            h.remove()


def saved_activations(model: nn.Module, fn: Callable[[], torch.Tensor]) -> tuple[SavedTensors, torch.Tensor]:
    """(what ``fn()``'s forward saved, its output); run ``.backward()`` on the output to free them."""
    with saved_tensors_meter(model) as saved:
        out = fn()
    return saved, out


@contextlib.contextmanager
def checkpointed_inputs(model: nn.Module, known: Optional[set[int]] = None,
                        every_layer: bool = False) -> Iterator[dict[int, int]]:
    """Within this context, the storages (data_ptr -> nbytes) of the tensor inputs of every HF
    ``GradientCheckpointingLayer`` whose checkpointing is on (``every_layer``: of every such layer)
    and that are not in ``known`` (already counted): what non-reentrant checkpointing keeps alive
    until backward recomputes the layer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    known = set(known or ())
    state = {_ptr(t) for t in (*model.parameters(), *model.buffers()) if t.numel()}
    found: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.numel() and value.device.type != "meta":
            ptr = _ptr(value)
            if ptr not in state and ptr not in known and ptr not in found:
                found[ptr] = value.untyped_storage().nbytes()
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    def hook(module, args, kwargs):
        if every_layer or (getattr(module, "gradient_checkpointing", False) and module.training):
            visit(args)
            visit(kwargs)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, GradientCheckpointingLayer)]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def unique_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        seen.setdefault(_ptr(local), local.untyped_storage().nbytes())
    return sum(seen.values())


def optimizer_state_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Every tensor in a torch optimizer's ``state`` (moments and step counters)."""
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def layer_names(model: nn.Module) -> list[str]:
    """Names of the model's HF ``GradientCheckpointingLayer`` s (its transformer blocks)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [n for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]


def largest_layer(saved: SavedTensors, layers: list[str], layer_inputs: set[int]) -> int:
    """Bytes of the largest one layer's own saved tensors in a forward *without* checkpointing: the
    storages only modules of that layer saved (not another layer or anything outside it, which stay
    alive anyway) that are not a layer's input. What backward holds extra while it recomputes that
    layer under activation checkpointing."""
    def layer_of(module: str) -> Optional[str]:
        return next((name for name in layers if module == name or module.startswith(name + ".")), None)

    sizes = dict.fromkeys(layers, 0)
    for ptr, modules in saved.savers.items():
        owners = {layer_of(m) for m in modules}
        if len(owners) == 1 and None not in owners and ptr not in layer_inputs:
            sizes[owners.pop()] += saved.storages[ptr]
    return max(sizes.values(), default=0)
