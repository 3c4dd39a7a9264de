"""GPU memory: allocator configuration, per-step peak metrics, and cache emptying in lock-step.

Everything here is safe on CPU: metrics are an empty dict and nothing calls into CUDA, so the same
training loop runs on a laptop and on a GPU node.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from vlmtrain.parallel.init import all_reduce_values

GIB = float(1 << 30)
# Both names configure the caching allocator; torch >= 2.9 reads PYTORCH_ALLOC_CONF first and still
# honours the older PYTORCH_CUDA_ALLOC_CONF.
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
DEFAULT_ALLOC_CONF = "expandable_segments:True"
MEMORY_KEYS = ("memory/peak_allocated_gib", "memory/peak_reserved_gib", "memory/alloc_retries")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AllocatorDecision:
    """What ``configure_allocator`` left in the environment, and why."""

    variable: str  # the environment variable that holds the setting
    value: str  # its value
    set_by: str  # "user" (kept as found) or "vlmtrain" (set by configure_allocator)
    effective: bool  # False when CUDA was already initialised, so the allocator never read it


def configure_allocator(logger: Optional[logging.Logger] = None, value: str = DEFAULT_ALLOC_CONF) -> AllocatorDecision:
    """Ask for expandable segments (or ``value``) unless the user already configured the allocator.

    Expandable segments let the allocator grow one mapping instead of carving fixed blocks, which
    removes most fragmentation from variable-length (packed) batches, the main cause of allocation
    retries and of reserved memory far above allocated. The allocator reads the variable once, when
    CUDA initialises, so call this before anything touches CUDA; a late call is logged as such.
    """
    logger = logger or log
    # torch.cuda.is_initialized() does not initialise CUDA itself (unlike is_available on some setups).
    late = torch.cuda.is_initialized()
    for name in ALLOC_CONF_VARS:
        if os.environ.get(name):
            decision = AllocatorDecision(name, os.environ[name], "user", not late)
            logger.info("allocator: keeping %s=%s set by the user", name, decision.value)
            break
    else:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = value
        decision = AllocatorDecision("PYTORCH_CUDA_ALLOC_CONF", value, "vlmtrain", not late)
        logger.info("allocator: set PYTORCH_CUDA_ALLOC_CONF=%s", value)
    if late:
        logger.warning("allocator: CUDA was initialised before configure_allocator(); %s=%s has no "
                       "effect in this process", decision.variable, decision.value)
    return decision


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def memory_stats(device: torch.device | str, reset: bool = True) -> dict[str, float]:
    """Peak allocated / reserved GiB since the last reset and the allocator's cumulative retry count
    (a retry means a cudaMalloc failed, the cache was flushed and the allocation tried again: a sign
    of fragmentation that costs a device-wide sync). Peaks are reset when ``reset`` so each call
    reports one step. Empty on CPU."""
    if not _is_cuda(device):
        return {}
    stats = torch.cuda.memory_stats(device)
    out = {
        "memory/peak_allocated_gib": stats.get("allocated_bytes.all.peak", 0) / GIB,
        "memory/peak_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / GIB,
        "memory/alloc_retries": float(stats.get("num_alloc_retries", 0)),
    }
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return out


def memory_stats_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Each metric's maximum and minimum over ranks as ``<key>_max`` / ``<key>_min`` (the ranks that
    run out first and the imbalance). Every rank must call it with the same keys (an empty dict on
    CPU everywhere: no collective then). Works for any per-rank scalars (step times too)."""
    if not stats:
        return {}
    keys = sorted(stats)
    highs = all_reduce_values([stats[k] for k in keys], "max")
    lows = all_reduce_values([stats[k] for k in keys], "min")
    out: dict[str, float] = {}
    for key, high, low in zip(keys, highs, lows):
        out[f"{key}_max"] = high
        out[f"{key}_min"] = low
    return out


class SyncedEmptyCache:
    """Empty the CUDA cache on every rank at the same step, or on none.

    ``torch.cuda.empty_cache()`` synchronises the device and releases memory that later steps must
    cudaMalloc again; a rank doing it alone stalls, and every other rank then waits at the next
    collective. So each step every rank reports whether it needs it (allocation retries grew since
    the last step, or reserved memory is above ``threshold_gib``), one all-reduce MAX turns that into
    one decision, and all ranks act on it together. Disabled, on CPU, or with nothing to decide it
    does no collective (the same on all ranks, since they share the device type and settings).
    """

    def __init__(self, threshold_gib: float = 0.0, enabled: bool = True, on_retries: bool = True):
        self.threshold_gib = threshold_gib  # 0: only allocation retries trigger it
        self.enabled = enabled
        self.on_retries = on_retries  # False: only the reserved threshold triggers it
        self.calls = 0  # times the cache was emptied (a metric)
        self._last_retries: Optional[int] = None

    def __call__(self, device: torch.device | str) -> bool:
        """Decide for this step (collective on CUDA); True when the cache was emptied."""
        if not self.enabled or not _is_cuda(device):
            return False
        stats = torch.cuda.memory_stats(device)
        retries = int(stats.get("num_alloc_retries", 0))
        grew = self.on_retries and self._last_retries is not None and retries > self._last_retries
        self._last_retries = retries
        over = self.threshold_gib > 0 and stats.get("reserved_bytes.all.current", 0) / GIB > self.threshold_gib
        need = all_reduce_values([1.0 if (grew or over) else 0.0], "max")[0] > 0
        if need:
            torch.cuda.empty_cache()
            self.calls += 1
        return need

    def metrics(self) -> dict[str, float]:
        """``memory/empty_cache_calls`` so far (empty when disabled)."""
        return {"memory/empty_cache_calls": float(self.calls)} if self.enabled else {}


def host_memory_stats() -> dict[str, float]:
    """This process's host memory in GiB: resident now (``/proc/self/statm``) and its lifetime peak
    (``getrusage``). Host memory is what CPU runs, loader processes' parents and CPU offload consume."""
    import resource

    out = {"memory/host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["memory/host_rss_gib"] = pages * os.sysconf("SC_PAGE_SIZE") / GIB
    except (OSError, ValueError, IndexError):  # no procfs (macOS): the peak alone
        return out
    # the kernel's high-water mark is updated lazily and can trail the current count by a few pages
    out["memory/host_peak_rss_gib"] = max(out["memory/host_peak_rss_gib"], out["memory/host_rss_gib"])
    return out


def rank_metrics(times: dict[str, float], device: torch.device | str) -> dict[str, float]:
    """Per-rank ``times`` (e.g. ``time/step_s``), host memory (:func:`host_memory_stats`) and, on CUDA,
    this rank's device memory peaks since the last call (:func:`memory_stats`, peaks reset), as their
    maximum and minimum over ranks (``<key>_max`` / ``<key>_min``) in one pair of collectives. Every
    rank must call it with the same keys."""
    return memory_stats_over_ranks({**times, **host_memory_stats(), **memory_stats(device)})
