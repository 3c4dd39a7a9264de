"""What keeps a run safe to trust and to stop: the non-finite step guard, the finiteness check before
a checkpoint is written, and the preemption signal (SIGTERM / SIGUSR1 -> checkpoint and exit 0).

Every decision here is taken by all ranks together: a non-finite step is seen from global values (the
loss summed over ranks, the global gradient norm), the weight check and the preemption flag are
reduced over ranks, so no rank checkpoints, skips or stops alone.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Optional, Sequence

import torch
from torch import nn

from vlmtrain.data.loader import Batch
from vlmtrain.errors import NonFiniteError
from vlmtrain.parallel.init import all_reduce_max, gather_to_main

# Fault injection for tests and drills: "7,12" poisons steps 7 and 12 on every rank, "7@1" on rank 1 only.
FAULT_ENV = "VLMTRAIN_FAULT_NONFINITE"
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def fault_steps(rank: int, spec: Optional[str] = None) -> frozenset[int]:
    """The steps whose loss this rank multiplies by NaN, from ``spec`` (default: ``$VLMTRAIN_FAULT_NONFINITE``):
    comma-separated ``STEP`` (every rank) or ``STEP@RANK`` items. A malformed item is a ValueError."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    steps = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        step, _, on_rank = item.partition("@")
        try:
            if not on_rank or int(on_rank) == rank:
                steps.add(int(step))
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={spec!r}: item {item!r} is not STEP or STEP@RANK") from None
    return frozenset(steps)


def check_step(step: int, result: dict, micro: Sequence[Batch], policy: str, log: logging.Logger) -> None:
    """Act on a non-finite step (collective when it is one, and then on every rank, since the decision
    comes from global values): ``skip`` warns with the step's sample ids (every rank's), ``stop`` (or
    a DeepSpeed step, whose update already happened) raises :class:`NonFiniteError` naming them."""
    if not result.get("nonfinite"):
        return
    mine = [i for b in micro for i in b.sample_ids]
    ranks = gather_to_main(mine)
    ids = [i for r in ranks for i in r] if ranks is not None else mine
    what = f"step {step}: non-finite loss {result['loss']} / grad norm {result['grad_norm']}"
    shown = f"samples {ids[:32]}" + (f" (+{len(ids) - 32} more)" if len(ids) > 32 else "")
    if result.get("updated"):
        raise NonFiniteError(f"{what}, {shown}; the DeepSpeed engine already applied the update, so the run "
                             "stops (resume from the last checkpoint: train.resume=true)")
    if policy == "stop":
        raise NonFiniteError(f"{what}, {shown}; stopped (train.on_nonfinite=stop); the last checkpoint holds "
                             "finite weights: resume with train.resume=true")
    log.warning("%s: update skipped (train.on_nonfinite=skip), %s", what, shown)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: an FSDP2 DTensor's shard, a ZeRO-3 parameter's partition."""
    if hasattr(t, "to_local"):
        return t.to_local()
    return getattr(t, "ds_tensor", t)


@torch.no_grad()
def nonfinite_parameters(module: nn.Module) -> list[str]:
    """Names of trainable parameters holding NaN/Inf on this rank (its shards), up to 8."""
    bad = []
    for name, p in module.named_parameters():
        if p.requires_grad and _local(p).numel() and not bool(torch.isfinite(_local(p)).all()):
            bad.append(name)
            if len(bad) == 8:
                break
    return bad


def assert_finite_weights(module: nn.Module, step: int) -> None:
    """Collective: raise :class:`NonFiniteError` on every rank if any rank's trainable weights hold
    NaN/Inf, so no checkpoint or final model is written from them."""
    bad = nonfinite_parameters(module)
    if all_reduce_max(float(bool(bad))) > 0:
        where = f" ({', '.join(bad)})" if bad else " (on another rank)"
        raise NonFiniteError(f"step {step}: trainable weights hold NaN/Inf{where}; no checkpoint is written")


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM ``--signal``) set a flag instead of killing the process; the loop asks
    :meth:`requested` after each step (max over ranks, so every rank stops after the same step),
    writes a checkpoint and returns. A second signal of the same kind while stopping is ignored. The
    previous handlers come back on :meth:`close`. Only the main thread can install handlers; elsewhere
    (a test calling ``train`` from a thread) the signals keep their default action."""

    def __init__(self, signals: Sequence[int] = PREEMPT_SIGNALS):
        self.signal: Optional[int] = None
        self._previous: dict[int, object] = {}
        try:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            self.close()

    def _handle(self, signum: int, _frame) -> None:
        self.signal = self.signal or signum

    def requested(self, world_size: int) -> bool:
        """Whether any rank got a preemption signal (collective when ``world_size`` > 1)."""
        local = float(self.signal is not None)
        return (all_reduce_max(local) if world_size > 1 else local) > 0

    @property
    def name(self) -> str:
        """The received signal's name (``SIGTERM``), or ``another rank's signal``."""
        return signal.Signals(self.signal).name if self.signal else "another rank's signal"

    def close(self) -> None:
        """Restore the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
