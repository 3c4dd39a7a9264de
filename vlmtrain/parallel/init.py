"""Process-group setup under ``torchrun`` and the few collectives the trainer needs for metrics.

``init_distributed()`` reads the environment ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), starts the process group (nccl on CUDA, gloo on CPU) and returns a small
:class:`DistInfo`. Without that environment it starts nothing and describes a single process, so the
same code runs under ``python -m vlmtrain`` and ``torchrun``.

Rank-0 output goes through :func:`print0` and :func:`get_logger` (non-zero ranks get a null logger),
so no call site says ``if rank == 0``. The reduction helpers are no-ops at world size 1, so call
sites need not check that either.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
BACKEND_PREFS = ("auto", "nccl", "gloo")
_NULL_LOGGER_NAME = "vlmtrain.null"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int  # processes in the job (1 without torchrun)
    local_rank: int  # rank on this machine: picks the CUDA device
    device: torch.device  # cuda:<local_rank> when CUDA is available, else cpu
    backend: str  # nccl | gloo | none (no process group: a single process without torchrun)
    is_main: bool  # rank 0: the process that logs, writes metrics and saves

    @property
    def distributed(self) -> bool:
        """True when a process group exists (collectives must be called on every rank)."""
        return self.backend != "none"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _pick_backend(pref: str, cuda: bool) -> str:
    """nccl on CUDA, gloo on CPU; an explicit choice is honoured when it can work."""
    if pref not in BACKEND_PREFS:
        raise ValueError(f"backend_pref must be one of {BACKEND_PREFS}, got {pref!r}")
    if pref == "auto":
        return "nccl" if cuda else "gloo"
    if pref == "nccl" and not cuda:
        raise RuntimeError("backend nccl needs CUDA; this process has none (use gloo or auto)")
    return pref


def init_distributed(backend_pref: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group from the ``torchrun`` environment and pin this rank's CUDA device.

    Without RANK/WORLD_SIZE in the environment no group is started (world size 1, backend "none").
    Calling it again in a process whose group already exists returns the same description.
    ``timeout_s`` bounds every collective: a rank that stops calling them (a hang) becomes an error
    after this long instead of blocking the job forever.
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend="none", is_main=True)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    backend = _pick_backend(backend_pref, cuda)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        # Before the group starts: nccl binds each rank's communicator to the current device, and
        # two ranks on one GPU would silently share it.
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # device_id (CUDA only) lets nccl create its communicator eagerly, which turns a
        # mis-configured node into an error at start instead of a hang at the first collective.
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    else:
        backend = dist.get_backend()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device,
                    backend=backend, is_main=rank == 0)


def destroy() -> None:
    """Tear the process group down (if any); safe to call twice and without a group.

    All ranks meet at a barrier first, so no rank closes its connections while another still has a
    collective in flight (gloo then aborted the slower rank at exit: "terminate called without an
    active exception", seen about once in 40 two-rank launches)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    """This process's rank, also before ``init_distributed`` (from torchrun's RANK)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: from the process group when one exists, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- rank-0 output -------------------------------------------------------------------------------
def is_main() -> bool:
    """True on rank 0 and in a single process (also before ``init_distributed``, from RANK)."""
    return _rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (nanochat's ``print0``)."""
    if _rank() == 0:
        builtins.print(*args, **kwargs)


def _null_logger() -> logging.Logger:
    """A logger that drops everything: no handlers reached, every level disabled."""
    logger = logging.getLogger(_NULL_LOGGER_NAME)
    logger.propagate = False  # never reach the root handlers
    logger.disabled = True
    return logger


def get_logger(info: Optional[DistInfo] = None, name: str = "vlmtrain") -> logging.Logger:
    """The ``name`` logger on the main rank, a null logger elsewhere: N ranks would print every line
    N times. ``info=None`` decides from the process group / RANK."""
    is_main = info.is_main if info is not None else _rank() == 0
    return logging.getLogger(name) if is_main else _null_logger()


# -- scalar reductions for metrics ---------------------------------------------------------------
def _comm_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_values(values: list[float], op: str) -> list[float]:
    """Reduce several scalars in one collective (``op``: sum | max | min); identity at world size 1.
    Every rank must call it with the same number of values."""
    if not _group_active():
        return [float(v) for v in values]
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    # float64: token and sample counts summed over many ranks stay exact (float32 loses integers above 2^24).
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=ops[op])
    return t.tolist()


def all_reduce_sum(value: float) -> float:
    """Sum of ``value`` over ranks (``value`` at world size 1)."""
    return all_reduce_values([value], "sum")[0]


def all_reduce_max(value: float) -> float:
    """Maximum of ``value`` over ranks (``value`` at world size 1)."""
    return all_reduce_values([value], "max")[0]


def all_reduce_min(value: float) -> float:
    """Minimum of ``value`` over ranks (``value`` at world size 1)."""
    return all_reduce_values([value], "min")[0]


def broadcast_object(obj: T, src: int = 0) -> T:
    """``src``'s picklable ``obj`` on every rank (e.g. a resume step, a data plan); ``obj`` itself at
    world size 1. Every rank must call it; the value passed on other ranks is ignored."""
    if not _group_active():
        return obj
    box = [obj]
    device = _comm_device() if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=src, device=device)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op at world size 1)."""
    if _group_active():
        dist.barrier()


def gather_to_main(obj: T) -> Optional[list[T]]:
    """Every rank's picklable ``obj`` as a list on rank 0 (``[obj]`` at world size 1), None on the
    other ranks. Every rank must call it."""
    if not _group_active():
        return [obj]
    out: Optional[list[T]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None  # type: ignore[list-item]
    dist.gather_object(obj, out, dst=0)
    return out


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Optional[T]:
    """``fn(*args, **kwargs)`` on rank 0 only (writing the run's files), None elsewhere; no collective."""
    return fn(*args, **kwargs) if _rank() == 0 else None


@contextlib.contextmanager
def main_first(local: bool = False) -> Iterator[None]:
    """Rank 0 runs the block before every other rank (e.g. it writes a file the others then read);
    ``local``: the first rank of each node (``LOCAL_RANK`` 0) before the node's others (a node-local
    file). A no-op at world size 1; every rank passes one barrier. If a first rank fails inside, the
    others fail at the barrier's timeout."""
    if not _group_active():
        yield
        return
    first = (_env_int("LOCAL_RANK", dist.get_rank()) if local else dist.get_rank()) == 0
    if not first:
        dist.barrier()
    yield
    if first:
        dist.barrier()
