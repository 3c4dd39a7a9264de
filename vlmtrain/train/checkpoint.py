"""Run-state checkpoints: model, optimizer, schedule, data position and every RNG, in one directory.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``step-N`` only when complete,
so a run killed at any instant leaves either a whole checkpoint or none.

Every model saves only its trainable tensors (``trained.safetensors``): the frozen rest is rebuilt
exactly as at the start (an HF model's from ``model.path``, the composed model's from its seeded
initialisation), so a LoRA checkpoint of a multi-billion-parameter model is megabytes. The final,
self-contained model is ``output_dir/model`` (``VLM.save_final``).

**Data-parallel runs** (the ``*_run_checkpoint`` functions, collective):

- **One process and DDP**: the plain format above (``trained.safetensors``, ``optimizer.pt``,
  ``trainer_state.json``, ``rng.pt``), written by rank 0 alone: DDP replicas hold the same weights
  and optimizer state after every step.
- **FSDP2** (parameters are DTensor shards): ``dcp/``, a ``torch.distributed.checkpoint`` (DCP)
  directory holding ``{"model", "optim"}`` from ``get_state_dict`` (trainable parameters only, as
  the plain format).
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

The ``*_run_checkpoint`` functions and ``model_for_saving`` are collective (every rank calls them).
The checkpoint directory must be on a file system every rank sees (one node, or a shared mount).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from safetensors.torch import load_file, save_file
from torch import nn

from vlmtrain.durable import fsync_dir
from vlmtrain.errors import CheckpointError
from vlmtrain.parallel.deepspeed_engine import DeepSpeedEngine
from vlmtrain.parallel.init import barrier, broadcast_object, gather_to_main, get_logger, on_main, rank_and_world
from vlmtrain.parallel.root import unwrap
from vlmtrain.train.guards import assert_finite_weights

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


def save_model_state(model: nn.Module, directory: Path) -> None:
    """The model's trainable tensors into ``directory`` (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, directory / TRAINED)


def load_model_state(model: nn.Module, directory: Path) -> None:
    """Restore what :func:`save_model_state` wrote; the names must match exactly (a checkpoint of
    another model or freeze/LoRA setting is an error, not a partial load)."""
    tensors = load_file(directory / TRAINED)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise CheckpointError(f"{directory / TRAINED} does not match the model's trainable parameters "
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
    fsync_dir(ckpt_root)
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


# -- data-parallel runs (collective) ----------------------------------------------------------
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


def _world() -> int:
    return rank_and_world()[1]


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
    """Write checkpoint ``step`` in the backend's format (module docstring); returns its final path.
    Trainable weights holding NaN/Inf on any rank raise :class:`NonFiniteError` instead (nothing written)."""
    assert_finite_weights(unwrap(parallel), step)
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
    checkpoint of any world size); returns the trainer state (``step``, ``totals``, ...). A checkpoint
    that cannot be read or does not fit the run raises :class:`CheckpointError` naming it."""
    try:
        return _load_run_checkpoint(path, parallel, optimizer, scheduler)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, torch.load, json and DCP each raise their own types
        # and say what broke, but not which run's checkpoint it was
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot resume from this checkpoint: {detail}") from e


def _load_run_checkpoint(path: Path, parallel: nn.Module, optimizer, scheduler) -> dict[str, Any]:
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
        raise CheckpointError(f"{path} is a plain (one-process or DDP) checkpoint; parallel.backend=fsdp2 resumes "
                         "only from its own DCP checkpoints: resume it with backend none or ddp")
    else:
        state = load_checkpoint(path, model, optimizer, scheduler)  # restores rank 0's RNG (rng.pt)
    rank, world = rank_and_world()
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
    rank, world = rank_and_world()
    saved = json.loads((path / STATE).read_text()) if (path / STATE).exists() else {}
    if not isinstance(parallel, DeepSpeedEngine) or not (path / DEEPSPEED_DIR).is_dir():
        kind = "DeepSpeed" if (path / DEEPSPEED_DIR).is_dir() else "plain or DCP"
        raise CheckpointError(f"{path} is a {kind} checkpoint: resume it with the backend that wrote it (a DeepSpeed "
                         "checkpoint converts to whole weights with deepspeed/zero_to_fp32.py)")
    if int(saved.get("world_size", world)) != world:
        raise CheckpointError(f"{path} was written by {saved['world_size']} DeepSpeed ranks; resume it on as many "
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
        if rank_and_world()[0] != 0:
            return None
        model = rebuild()
        model.load_state_dict(full, strict=True)
        return model
    if not is_sharded(parallel):
        return on_main(unwrap, parallel)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(unwrap(parallel), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank_and_world()[0] != 0:
        return None
    model = rebuild()
    model.load_state_dict(full, strict=True)
    return model


BEST = "best"  # checkpoints/best: the model of the best validation, in the final model's format
BEST_INFO = "best.json"


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def recover_best(ckpt_root: Path) -> Optional[Path]:
    """``checkpoints/best`` after a crash between the two renames of :func:`save_best_model` (the
    previous best is put back from ``.old-best``); None when the run has no best model yet."""
    best, old = ckpt_root / BEST, ckpt_root / f".old-{BEST}"
    if not best.exists() and old.exists():
        os.rename(old, best)
        fsync_dir(ckpt_root)
    shutil.rmtree(old, ignore_errors=True)
    return best if best.exists() else None


def save_best_model(ckpt_root: Path, parallel: nn.Module, rebuild: Callable[[], nn.Module],
                    info: dict[str, Any]) -> Path:
    """Write the current weights as ``checkpoints/best`` (what ``VLM.save_final`` writes, plus
    ``best.json`` = ``info``), replacing the previous best only once the new one is complete and on
    disk: written into ``.tmp-best``, then ``best`` -> ``.old-best``, ``.tmp-best`` -> ``best``
    (:func:`recover_best` undoes a crash in between). Checkpoint rotation never touches it.
    Collective (FSDP2 / DeepSpeed gather the weights); rank 0 writes."""
    model = model_for_saving(parallel, rebuild)
    best = ckpt_root / BEST
    if model is not None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp, old = ckpt_root / f".tmp-{BEST}", ckpt_root / f".old-{BEST}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_final(tmp)
        (tmp / BEST_INFO).write_text(json.dumps(info, indent=1))
        _fsync_tree(tmp)
        recover_best(ckpt_root)
        if best.exists():
            os.rename(best, old)
        os.rename(tmp, best)
        fsync_dir(ckpt_root)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return best
