"""A content fingerprint of modules' weights: what a feature cache and a saved spatial branch use to
tell whether the weights that produced something are the ones at hand."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import torch
from torch import nn

DIGEST_SIZE = 20


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw bytes of a tensor in memory order (bf16 included, which numpy cannot represent)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def fingerprint_modules(*modules: nn.Module, extra: Optional[Any] = None) -> str:
    """A hex digest over every parameter and buffer of ``modules`` (the feature producers).

    Hashed, per module in argument order: its class name, then for each parameter and buffer its name,
    dtype, shape and bytes. Any weight change (one element is enough), a dtype change or a different
    architecture gives a different fingerprint. Non-persistent buffers are included because they
    take part in the forward (e.g. SigLIP's ``position_ids``).

    Not covered: hyper-parameters that live outside tensors (activation function, norm epsilon,
    attention implementation). Pass anything of that kind that may change as ``extra`` (any
    JSON-serialisable value). Call this on the full, unsharded module before FSDP/DeepSpeed wrap it:
    a sharded parameter only holds this rank's slice. Cost: one pass over the weights (about a second
    per GB on a CPU core), so compute it once per run.
    """
    if not modules:
        raise ValueError("fingerprint_modules needs at least one module")
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for i, module in enumerate(modules):
        h.update(f"module {i} {type(module).__qualname__}\n".encode())
        tensors = list(module.named_parameters(remove_duplicate=True)) + list(module.named_buffers())
        for name, t in tensors:
            h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(_tensor_bytes(t))
    if extra is not None:
        h.update(b"extra " + json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()
