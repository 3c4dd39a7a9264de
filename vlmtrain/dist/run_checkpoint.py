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
- **DeepSpeed** (ZeRO-2/3): ``deepspeed/`` is the engine's own checkpoint (``engine.save``) under the
  tag ``zero``: every rank writes its partition of the optimizer state (and under ZeRO-3 its model
  states), rank 0 the model states with the scheduler's state. The trainer state (step, totals,
  world size) and every rank's RNG travel in ``client_state``; rank 0 also writes
  ``trainer_state.json`` and ``rng.pt`` for readers of the run. It resumes under ``deepspeed`` on the
  same world size only; DeepSpeed's ``zero_to_fp32.py`` (copied into ``deepspeed/``) converts it
  to whole weights.

Plain and DCP checkpoints add ``rng-ranks.pt``: every rank's RNG state (gathered to rank 0). On the
same world size each rank restores its own; on another, every rank restores rank 0's (``rng.pt``).
The data position is the step: the plan is a pure function of (seed, epoch, world size), so after a
resume on another world size the weights, optimizer and schedule continue exactly while the step's
samples are dealt to the new ranks (unpacked plans cut the same global batch; packed plans shard
their packs anew).

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

from vlmtrain.dist.deepspeed_engine import DeepSpeedEngine
from vlmtrain.dist.init import barrier, broadcast_object, gather_to_main, get_logger, on_main
from vlmtrain.dist.parallelize import unwrap
from vlmtrain.train.checkpoint import (
    RNG, STATE, begin_checkpoint, finish_checkpoint, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
    set_rng_state,
)

DCP_DIR = "dcp"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "zero"  # one DeepSpeed checkpoint per step directory, so one fixed tag
RNG_RANKS = "rng-ranks.pt"


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensor shards (FSDP2); no collective."""
    if isinstance(model, DeepSpeedEngine):
        return False
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
    if isinstance(parallel, DeepSpeedEngine):
        tmp = Path(broadcast_object(str(on_main(begin_checkpoint, ckpt_root, step))))
        # Every rank's client_state holds all ranks' RNG: DeepSpeed keeps rank 0's under ZeRO-2 and each
        # rank's own under ZeRO-3 (one model-states file per rank), and either must restore every rank.
        client = dict(state, step=step, rng_ranks=broadcast_object(rngs))
        parallel.save(tmp / DEEPSPEED_DIR, client_state=client, tag=DEEPSPEED_TAG)
        barrier()  # every rank's partitions are written before rank 0 renames the directory
        on_main(finish_checkpoint, tmp, step, scheduler, state, keep)
        barrier()
        return final
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
    if isinstance(parallel, DeepSpeedEngine) or (path / DEEPSPEED_DIR).is_dir():
        return _load_deepspeed(path, parallel)
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


def _load_deepspeed(path: Path, parallel: nn.Module | DeepSpeedEngine) -> dict[str, Any]:
    """Restore a DeepSpeed checkpoint into the engine (weights, optimizer, scheduler) and this rank's RNG."""
    rank, world = _rank_and_world()
    saved = json.loads((path / STATE).read_text()) if (path / STATE).exists() else {}
    if not isinstance(parallel, DeepSpeedEngine) or not (path / DEEPSPEED_DIR).is_dir():
        kind = "DeepSpeed" if (path / DEEPSPEED_DIR).is_dir() else "plain or DCP"
        raise ValueError(f"{path} is a {kind} checkpoint: resume it with the backend that wrote it (a DeepSpeed "
                         "checkpoint converts to whole weights with deepspeed/zero_to_fp32.py)")
    if int(saved.get("world_size", world)) != world:
        raise ValueError(f"{path} was written by {saved['world_size']} DeepSpeed ranks; resume it on as many "
                         f"(this run has {world}) or convert it with deepspeed/zero_to_fp32.py")
    client = parallel.load(path / DEEPSPEED_DIR, tag=DEEPSPEED_TAG)
    set_rng_state(client.pop("rng_ranks")[rank])
    return client


def model_for_saving(parallel: nn.Module, rebuild: Callable[[], nn.Module]) -> Optional[nn.Module]:
    """The trained model as one plain module on rank 0 (None elsewhere), for the final ``model/``.

    Unsharded models are returned as they are. FSDP2 shards are gathered into a full state dict
    (frozen weights too: ``rebuild`` need not reproduce them) on rank 0's CPU and loaded into
    ``rebuild()``, a fresh copy built as at the start, so the usual ``save_pretrained`` / merged
    export runs on plain tensors. A DeepSpeed engine's weights are gathered the same way
    (``full_state_dict``: whole fp32 copies, of the bf16 weights under bf16)."""
    if isinstance(parallel, DeepSpeedEngine):
        full = parallel.full_state_dict()  # collective
        if _rank_and_world()[0] != 0:
            return None
        model = rebuild()
        model.load_state_dict(full, strict=True)
        return model
    if not is_sharded(parallel):
        return on_main(unwrap, parallel)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(unwrap(parallel), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank_and_world()[0] != 0:
        return None
    model = rebuild()
    model.load_state_dict(full, strict=True)
    return model
