"""Atomic checkpoints: model, optimizer, schedule, data position and every RNG, in one directory.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``step-N`` only when complete,
so a run killed at any instant leaves either a whole checkpoint or none.

The composed model is saved whole (``save_pretrained``). An HF adapter saves only its trainable
tensors (``trained.safetensors``): the frozen rest is ``model.path``'s and is reloaded from there on
resume, so a LoRA checkpoint of a multi-billion-parameter model is megabytes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from vlmtrain.models.hf_base import HFVLMAdapter

STATE = "trainer_state.json"
OPTIM = "optimizer.pt"
RNG = "rng.pt"
TRAINED = "trained.safetensors"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states (CUDA too when present)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_state(model: nn.Module, directory: Path) -> None:
    """The model's weights into ``directory``: whole for the composed model, trainable tensors only
    for an HF adapter (see the module docstring)."""
    if not isinstance(model, HFVLMAdapter):
        model.save_pretrained(directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, directory / TRAINED)


def load_model_state(model: nn.Module, directory: Path) -> None:
    """Restore what :func:`save_model_state` wrote; the names must match exactly (a checkpoint of
    another model or freeze/LoRA setting is an error, not a partial load)."""
    if not isinstance(model, HFVLMAdapter):
        load_model(model, str(directory / "model.safetensors"), strict=True)
        return
    tensors = load_file(directory / TRAINED)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"{directory / TRAINED} does not match the model's trainable parameters "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}); was the model, freeze or LoRA "
                         "setting changed since it was written?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def save_checkpoint(
    ckpt_root: Path, step: int, model, optimizer, scheduler, trainer_state: dict[str, Any], keep: int = 2,
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``; ``extra`` names more
    objects to ``torch.save`` into it (e.g. every rank's RNG state)."""
    tmp = begin_checkpoint(ckpt_root, step)
    save_model_state(model, tmp)
    torch.save(optimizer.state_dict(), tmp / OPTIM)
    return finish_checkpoint(tmp, step, scheduler, trainer_state, keep, extra)


def begin_checkpoint(ckpt_root: Path, step: int) -> Path:
    """The empty temporary directory checkpoint ``step`` is written into (a stale one is removed)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_checkpoint(tmp: Path, step: int, scheduler, trainer_state: dict[str, Any], keep: int,
                      extra: Optional[dict[str, Any]] = None) -> Path:
    """Add the RNG, ``extra`` objects and trainer state (step, schedule) to ``tmp`` (model and optimizer
    are already there), fsync, rename it to ``step-N`` and prune all but the newest ``keep``."""
    ckpt_root = tmp.parent
    final = ckpt_root / f"step-{step:07d}"
    torch.save(rng_state(), tmp / RNG)
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / name)
    state = dict(trainer_state, step=step, scheduler=scheduler.state_dict())
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        if f.is_file():  # subdirectories (a DCP checkpoint) are synced by their writer
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    if not ckpt_root.exists():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from ``path``; returns the trainer state."""
    load_model_state(model, path)
    optimizer.load_state_dict(torch.load(path / OPTIM, weights_only=True))
    state = json.loads((path / STATE).read_text())
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(torch.load(path / RNG, weights_only=True))
    return state
