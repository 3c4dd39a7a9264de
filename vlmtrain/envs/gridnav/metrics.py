"""Navigation metrics: nDTW, the per-episode ``EpisodeResult`` and the summary of closed-loop
results. Imports go one way, simulate -> metrics -> world."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .world import SUCCESS_RADIUS

OUTCOMES: tuple[str, ...] = ("success", "out_of_steps", "stopped_at_distractor",
                             "stopped_elsewhere")


@dataclass
class EpisodeResult:
    """Metrics of one finished episode (built by ``simulate.rollout``; ``outcome`` is one of
    ``OUTCOMES``)."""

    index: int
    success: bool
    oracle_success: bool
    nav_error: float
    path_length: float
    reference_length: float
    spl: float
    ndtw: float
    steps: int
    outcome: str
    actions: list[int]


def ndtw(path: Sequence[tuple[float, float]], reference: Sequence[tuple[float, float]],
         threshold: float = SUCCESS_RADIUS) -> float:
    """Normalised dynamic time warping, exp(-DTW / (|reference| * threshold)), on 2-D points."""
    n, m = len(path), len(reference)
    if n == 0 or m == 0:
        return 0.0
    inf = math.inf
    prev = [inf] * (m + 1)
    prev[0] = 0.0
    for i in range(n):
        px, py = path[i]
        cur = [inf] * (m + 1)
        for j in range(m):
            rx, ry = reference[j]
            d = math.hypot(px - rx, py - ry)
            cur[j + 1] = d + min(prev[j + 1], cur[j], prev[j])
        prev = cur
    return math.exp(-prev[m] / (m * threshold))


def dedup(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop consecutive repeats (turns and collisions do not move the agent), as nDTW expects a
    path of places rather than of time steps."""
    out: list[tuple[float, float]] = []
    for p in points:
        if not out or out[-1] != p:
            out.append(p)
    return out


METRIC_KEYS = ("sr", "spl", "ne", "os", "ndtw")


def metric_sums(results: Sequence[EpisodeResult]) -> dict[str, float]:
    """SR, SPL, navigation error, oracle success and nDTW summed over ``results`` (unrounded: shards
    of one evaluation add up, and the means follow by dividing by the episode count)."""
    return {"sr": float(sum(r.success for r in results)), "spl": float(sum(r.spl for r in results)),
            "ne": float(sum(r.nav_error for r in results)), "os": float(sum(r.oracle_success for r in results)),
            "ndtw": float(sum(r.ndtw for r in results))}


def summarize(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Mean SR, SPL, navigation error, oracle success, nDTW and the fraction of each outcome."""
    n = len(results)

    def mean(total: float) -> float:
        return round(total / n, 4) if n else 0.0

    return {
        "episodes": n,
        **{k: mean(v) for k, v in metric_sums(results).items()},
        "outcomes": {o: mean(sum(float(r.outcome == o) for r in results)) for o in OUTCOMES},
    }
