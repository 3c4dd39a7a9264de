"""Checkpoints of a data-parallel run: the format per backend, who writes what, resuming elsewhere.

- **One process and DDP**: the plain format of ``train/checkpoint.py`` (``model.safetensors`` or
  ``trained.safetensors``, ``optimizer.pt``, ``trainer_state.json``, ``rng.pt``), written by rank 0
  alone: DDP replicas hold the same weights and optimizer state after every step.
- **FSDP2** (parameters are DTensor shards): ``dcp/``, a ``torch.distributed.checkpoint`` (DCP)
  directory holding ``{"model", "optim"}`` from ``get_state_dict`` (trainable parameters only, as
  the plain format of an HF adapter; frozen weights come from ``model.path`` or the seeded init).
  Every rank writes its own shards; rank 0 then adds ``trainer_state.json`` and ``rng.pt`` and
  renames the directory, so a checkpoint is still whole or absent. DCP reshards on load: a
  checkpoint of N ranks resumes on M ranks, or in one process without any process group.

Both add ``rng-ranks.pt``: every rank's RNG state (gathered to rank 0). On the same world size each
rank restores its own; on another, every rank restores rank 0's (``rng.pt``). The data position is the
step: the plan is a pure function of (seed, epoch, world size), so after a resume on another world
size the weights, optimizer and schedule continue exactly while the step's samples are dealt to the
new ranks (unpacked plans cut the same global batch; packed plans shard their packs anew).

All functions here are collective (every rank calls them) unless their docstring says otherwise.
The checkpoint directory must be on a file system every rank sees (one node, or a shared mount).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from vlmtrain.dist.init import barrier, broadcast_object, gather_to_main, get_logger, on_main
from vlmtrain.dist.parallelize import unwrap
from vlmtrain.train.checkpoint import (
    RNG, STATE, begin_checkpoint, finish_checkpoint, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
    set_rng_state,
)

DCP_DIR = "dcp"
RNG_RANKS = "rng-ranks.pt"


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensor shards (FSDP2); no collective."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap(model).parameters())


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _world() -> int:
    return _rank_and_world()[1]


def _state_dict_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def latest_run_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """Rank 0's newest complete checkpoint, on every rank (so all resume from the same one)."""
    found = on_main(latest_checkpoint, ckpt_root)
    path = broadcast_object(str(found) if found is not None else "")
    return Path(path) if path else None


def save_run_checkpoint(ckpt_root: Path, step: int, parallel: nn.Module, optimizer, scheduler,
                        trainer_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` in the backend's format (module docstring); returns its final path."""
    rngs = gather_to_main(rng_state())
    state = dict(trainer_state, world_size=_world())
    final = ckpt_root / f"step-{step:07d}"
    if not is_sharded(parallel):
        on_main(save_checkpoint, ckpt_root, step, unwrap(parallel), optimizer, scheduler, state, keep,
                extra={RNG_RANKS: rngs})
        barrier()  # nobody reads or prunes checkpoints before rank 0 is done
        return final
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = on_main(begin_checkpoint, ckpt_root, step)
    tmp = Path(broadcast_object(str(tmp)))
    model_sd, optim_sd = get_state_dict(unwrap(parallel), optimizer, options=_state_dict_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_DIR)  # ends in a collective
    on_main(finish_checkpoint, tmp, step, scheduler, state, keep, {RNG_RANKS: rngs})
    barrier()
    return final


def load_run_checkpoint(path: Path, parallel: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and this rank's RNG from ``path`` (either format; a DCP
    checkpoint of any world size); returns the trainer state (``step``, ``totals``, ...)."""
    model = unwrap(parallel)
    if (path / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_dict_options())
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended, not a mistake
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path / DCP_DIR, no_dist=_world() == 1)
        # Not strict: frozen weights are not in the checkpoint (they are the model's own); every
        # trainable one is, or dcp.load above has failed naming it.
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=_state_dict_options(strict=False))
        state = json.loads((path / STATE).read_text())
        scheduler.load_state_dict(state["scheduler"])
    elif is_sharded(parallel):
        raise ValueError(f"{path} is a plain (one-process or DDP) checkpoint; parallel.backend=fsdp2 resumes "
                         "only from its own DCP checkpoints: resume it with backend none or ddp")
    else:
        state = load_checkpoint(path, model, optimizer, scheduler)  # restores rank 0's RNG (rng.pt)
    rank, world = _rank_and_world()
    saved_world = int(state.get("world_size", 1))
    if (path / RNG_RANKS).exists() and saved_world == world:
        set_rng_state(torch.load(path / RNG_RANKS, weights_only=True)[rank])
    else:
        set_rng_state(torch.load(path / RNG, weights_only=True))
        if saved_world != world:
            get_logger().info("resume: checkpoint of %d rank(s) on %d: weights, optimizer and schedule continue; "
                              "the data plan is recomputed for %d rank(s) and every rank takes rank 0's RNG",
                              saved_world, world, world)
    return state


def model_for_saving(parallel: nn.Module, rebuild: Callable[[], nn.Module]) -> Optional[nn.Module]:
    """The trained model as one plain module on rank 0 (None elsewhere), for the final ``model/``.

    Unsharded models are returned as they are. FSDP2 shards are gathered into a full state dict
    (frozen weights too: ``rebuild`` need not reproduce them) on rank 0's CPU and loaded into
    ``rebuild()``, a fresh copy built as at the start, so the usual ``save_pretrained`` / merged
    export runs on plain tensors."""
    if not is_sharded(parallel):
        return on_main(unwrap, parallel)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(unwrap(parallel), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank_and_world()[0] != 0:
        return None
    model = rebuild()
    model.load_state_dict(full, strict=True)
    return model
