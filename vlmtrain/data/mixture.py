"""Dataset mixtures: a seeded selection plan and a summary table (``name%N`` specs: ``config_sources.py``).

A mixture keeps ``N`` percent of each source's samples: ``N < 100`` draws a subset without
replacement, ``N > 100`` repeats the source ``N // 100`` whole times and draws the remainder
without replacement. `plan_mixture` is a pure function of its arguments (no global RNG, no
``hash()``, no dependence on the order other sources were added), so every rank computes the very
same plan without communicating. It decides *which* samples are used, not in which order: the
sampler shuffles per epoch.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "format_mixture_table",
    "held_out_episodes",
    "plan_mixture",
    "planned_count",
    "select_array",
    "select_indices",
    "summarize_mixture",
]


def planned_count(n: int, percent: float) -> int:
    """How many samples ``percent`` % of ``n`` gives: ``n * percent / 100`` rounded half up."""
    if n < 0:
        raise ValueError(f"sample count must be >= 0, got {n}")
    if not math.isfinite(percent) or percent < 0:
        raise ValueError(f"percent must be a finite number >= 0, got {percent}")
    # Half-up rather than Python's banker's rounding, so 50 % of 3 is 2 whatever the parity.
    return int(math.floor(n * percent / 100.0 + 0.5))


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator seeded by (seed, source name) only.

    Keyed by name so adding or reordering other sources leaves this source's selection unchanged;
    sha256 rather than ``hash()`` because ``hash(str)`` differs between processes.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{name}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def select_array(n: int, percent: float, seed: int, name: str = "") -> np.ndarray:
    """Indices of one source kept at ``percent`` %, ascending (repeats adjacent), as int64.

    Whole copies first (every index ``k // n`` times for ``k = planned_count(n, percent)``), then
    the remainder drawn without replacement by a generator seeded with ``(seed, name)``.
    """
    k = planned_count(n, percent)
    if n == 0 or k == 0:
        return np.zeros(0, dtype=np.int64)
    whole, rest = divmod(k, n)
    counts = np.full(n, whole, dtype=np.int64)
    if rest:
        counts[_rng(seed, name).choice(n, size=rest, replace=False)] += 1
    return np.repeat(np.arange(n, dtype=np.int64), counts)


def held_out_episodes(episodes: np.ndarray, fraction: float, seed: int, name: str = "") -> np.ndarray:
    """Which samples belong to the validation episodes of one source: a bool mask over ``episodes``
    (each sample's episode id). ``planned_count(E, 100 x fraction)`` of the source's E distinct
    episodes are held out, at least one when ``fraction > 0`` and at most E - 1, drawn by a generator
    seeded with ``(seed, "val/" + name)`` only, so the split is the same on every rank and in every
    run of the same seed, and never cuts an episode (its frames are all train or all validation)."""
    episodes = np.asarray(episodes)
    if fraction <= 0 or len(episodes) == 0:
        return np.zeros(len(episodes), dtype=bool)
    uniq = np.unique(episodes)
    k = min(max(planned_count(len(uniq), 100.0 * fraction), 1), len(uniq) - 1)
    if k <= 0:
        return np.zeros(len(episodes), dtype=bool)
    held = _rng(seed, "val/" + name).choice(uniq, size=k, replace=False)
    return np.isin(episodes, held)


def select_indices(n: int, percent: float, seed: int, name: str = "") -> list[int]:
    """:func:`select_array` as a list of ints."""
    return select_array(n, percent, seed, name).tolist()


def plan_mixture(
    sources: Mapping[str, int], percents: Mapping[str, float], seed: int
) -> list[tuple[str, int]]:
    """Which samples of which source a run uses.

    Args:
        sources: source name -> number of samples it has (iteration order = plan order).
        percents: source name -> percent to keep; a source not listed keeps 100 %.
        seed: the run's data seed.

    Returns:
        ``(source, index)`` pairs, source by source in `sources` order, indices ascending within
        a source (an up-sampled index appears several times).

    Raises:
        ValueError: a percent for an unknown source, a negative count or percent.
    """
    unknown = sorted(set(percents) - set(sources))
    if unknown:
        raise ValueError(
            f"percent given for unknown source(s) {', '.join(unknown)}; "
            f"known: {', '.join(sources) or '(none)'}"
        )
    plan: list[tuple[str, int]] = []
    for name, n in sources.items():
        indices = select_indices(n, float(percents.get(name, 100.0)), seed, name)
        plan.extend((name, i) for i in indices)
    return plan


def summarize_mixture(plan: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Planned samples per source, in order of first appearance."""
    counts: dict[str, int] = {}
    for name, _ in plan:
        counts[name] = counts.get(name, 0) + 1
    return counts


def format_mixture_table(
    sources: Mapping[str, int],
    percents: Mapping[str, float],
    plan: Sequence[tuple[str, int]] | Mapping[str, int],
) -> str:
    """A plain-text table printed at start: available, percent, planned and share per source
    (``plan``: the planned pairs, or the planned count per source)."""
    planned = dict(plan) if isinstance(plan, Mapping) else summarize_mixture(plan)
    total = sum(planned.values())
    rows = [("source", "available", "percent", "planned", "share")]
    for name, n in sources.items():
        k = planned.get(name, 0)
        share = f"{100.0 * k / total:.1f}%" if total else "-"
        rows.append((name, str(n), f"{percents.get(name, 100.0):g}%", str(k), share))
    rows.append(("total", str(sum(sources.values())), "", str(total), "100.0%" if total else "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
