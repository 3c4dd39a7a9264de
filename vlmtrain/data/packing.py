"""Packing planned before sharding: packs under two budgets, packs balanced across ranks, packed masks.

The plan is a pure function of its arguments (lengths, costs, seed, epoch), so every rank computes
the same plan without communication and a resumed run recomputes it instead of replaying a loader.
Inputs are per-sample numpy arrays (or sequences) and outputs are arrays too (:class:`Packs`, the
members of all packs in CSR form; :class:`ShardPlan`): nothing holds a Python object per sample, so
plans of tens of millions of samples stay small.

- :func:`plan_packs` groups samples into packs that respect an LLM-token budget *and* a vision budget
  (frames or patches to encode): a pack full of short, image-heavy samples would otherwise blow the
  vision encoder's memory while looking cheap in tokens.
- :func:`shard_packs` deals each step's packs to ranks so that LLM tokens and vision cost are
  balanced (the slowest rank sets the step time under data parallelism).
- :func:`pack_position_ids` (and ``models/packed_attention.py``'s document masks) make a pack compute exactly what its
  documents would compute one by one (tested against separate forwards of an HF Llama).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from vlmtrain.data.grouping import grouped_chunks
from vlmtrain.models.protocol import IGNORE_INDEX
DEFAULT_WINDOW = 512
# A pack whose fuller budget is below this share stays open into the next packing window.
CARRY_BELOW_FILL = 0.75


@dataclass(eq=False)
class Packs:
    """Packs in CSR form: pack j holds the sample indices ``order[bounds[j]:bounds[j + 1]]``.

    Indexing and iteration give plain lists of ints (``packs[j]``, ``list(packs)``), so callers that
    treat packs as a list of lists keep working; the arrays are what is stored and computed on.
    """

    order: np.ndarray  # (N,) int64 sample indices, pack after pack
    bounds: np.ndarray  # (P + 1,) int64 offsets into ``order``, from 0 to N

    @classmethod
    def from_lists(cls, packs: Sequence[Sequence[int]]) -> "Packs":
        """Packs from a list of per-pack sample index lists."""
        sizes = np.fromiter((len(p) for p in packs), dtype=np.int64, count=len(packs))
        order = np.fromiter((i for p in packs for i in p), dtype=np.int64, count=int(sizes.sum()))
        return cls(order, np.r_[0, np.cumsum(sizes)].astype(np.int64))

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, j: int) -> list[int]:
        j = range(len(self))[j]  # negative indices, and IndexError past the end
        return self.order[self.bounds[j]:self.bounds[j + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        bounds = self.bounds.tolist()
        return (self.order[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:]))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Packs):
            return np.array_equal(self.order, other.order) and np.array_equal(self.bounds, other.bounds)
        if isinstance(other, (list, tuple)):
            return list(self) == [list(p) for p in other]
        return NotImplemented

    def sizes(self) -> np.ndarray:
        """Samples per pack."""
        return np.diff(self.bounds)

    def sums(self, values: Union[np.ndarray, Sequence[int]]) -> np.ndarray:
        """Per-pack sum of an integer per-sample quantity (int64; an empty pack sums to 0)."""
        running = np.r_[0, np.cumsum(np.asarray(values, dtype=np.int64)[self.order])]
        return running[self.bounds[1:]] - running[self.bounds[:-1]]

    def take(self, ids: Union[np.ndarray, Sequence[int]]) -> "Packs":
        """The packs ``ids`` (in that order) as new Packs."""
        ids = np.asarray(ids, dtype=np.int64)
        sizes = self.sizes()[ids]
        bounds = np.r_[0, np.cumsum(sizes)].astype(np.int64)
        gather = np.repeat(self.bounds[:-1][ids] - bounds[:-1], sizes) + np.arange(bounds[-1])
        return Packs(self.order[gather], bounds)


class _Chunks:
    """Numbers appended from Python, kept as numpy chunks: no Python list of all samples builds up."""

    def __init__(self, dtype: type = np.int64):
        self.dtype, self.parts, self.buf = dtype, [], []

    def extend(self, values: Iterable) -> None:
        self.buf.extend(values)
        if len(self.buf) >= 1 << 16:
            self.parts.append(np.array(self.buf, dtype=self.dtype))
            self.buf = []

    def array(self) -> np.ndarray:
        return np.concatenate([*self.parts, np.array(self.buf, dtype=self.dtype)])


def _validate(lengths: Union[np.ndarray, Sequence[int]], vision_costs: Union[np.ndarray, Sequence[int]],
              max_tokens: int, max_vision: int) -> tuple[np.ndarray, np.ndarray]:
    """Budgets positive, one cost per sample, and no sample that alone exceeds a budget; returns the
    lengths and vision costs as int64 arrays."""
    if len(lengths) != len(vision_costs):
        raise ValueError(f"{len(lengths)} lengths but {len(vision_costs)} vision costs")
    if max_tokens <= 0 or max_vision <= 0:
        raise ValueError(f"budgets must be positive: max_tokens={max_tokens}, max_vision={max_vision} "
                         f"(for text-only data pass zero vision costs and max_vision=1)")
    tok, vis = np.asarray(lengths, dtype=np.int64), np.asarray(vision_costs, dtype=np.int64)
    bad = (tok <= 0) | (vis < 0) | (tok > max_tokens) | (vis > max_vision)
    if bad.any():
        i = int(bad.argmax())  # the first offending sample
        n, v = int(tok[i]), int(vis[i])
        if n <= 0 or v < 0:
            raise ValueError(f"sample {i}: length {n} must be > 0 and vision cost {v} >= 0")
        # Never truncate: a cut sample silently loses its answer tokens or image slots.
        if n > max_tokens:
            raise ValueError(f"sample {i}: {n} tokens > max_tokens={max_tokens}")
        raise ValueError(f"sample {i}: vision cost {v} > max_vision={max_vision}")
    return tok, vis


def _first_fit(ids: np.ndarray, tok: np.ndarray, vis: np.ndarray, max_tokens: int, max_vision: int,
               members: list[list[int]], free_tok: list[int], free_vis: list[int]) -> None:
    """Put each sample of ``ids`` (in order; ``tok``/``vis`` its costs) into the first open pack where
    both budgets fit, opening a pack when none does. The open packs (``members`` and their free room)
    are updated in place.

    The scan skips packs with less room than the window's smallest sample (they can take none of
    its samples, so the first fit is unchanged): a window's full packs cost nothing once full."""
    lo_t, lo_v = int(tok.min()), int(vis.min())
    live = [p for p in range(len(members)) if free_tok[p] >= lo_t and free_vis[p] >= lo_v]
    for i, t, v in zip(ids.tolist(), tok.tolist(), vis.tolist()):
        for p in live:
            if free_tok[p] >= t and free_vis[p] >= v:
                break
        else:  # no open pack fits: a new one
            p = len(members)
            members.append([])
            free_tok.append(max_tokens)
            free_vis.append(max_vision)
            live.append(p)
        members[p].append(i)
        room_t = free_tok[p] = free_tok[p] - t
        room_v = free_vis[p] = free_vis[p] - v
        if room_t < lo_t or room_v < lo_v:
            live.remove(p)


def plan_packs(lengths: Union[np.ndarray, Sequence[int]], vision_costs: Union[np.ndarray, Sequence[int]],
               max_tokens: int, max_vision: int, seed: int, epoch: int, window: int = DEFAULT_WINDOW,
               groups: Optional[np.ndarray] = None, group_size: int = 0) -> Packs:
    """Sample indices per pack for one epoch; every sample appears in exactly one pack.

    Algorithm: a seeded permutation of all samples (``default_rng([seed, epoch])``), cut into windows
    of ``window`` samples; inside a window, two-budget first-fit-decreasing — samples sorted by their
    combined size ``len / max_tokens + vision / max_vision`` and each put into the first open pack
    where both budgets still fit (the sum gave fewer, fuller packs than ``max`` of the two shares on
    skewed, independent length/frame mixes). Windows keep the epoch's randomness (a global sort would
    put all long samples at the start of the epoch) and bound the first-fit cost; only packs still
    under ``CARRY_BELOW_FILL`` stay open into the next window, which is what keeps tiny packs rare.
    Finally the pack order is shuffled with the same generator, so step k does not systematically get
    the big packs of its window.

    With ``groups`` and ``group_size`` > 1 (episode grouping, ``data/grouping.py``) the permutation
    keeps chunks of ``group_size`` samples of one group together, each chunk is its own window (no
    pack stays open into the next chunk) and the packs keep the chunk order, so a chunk's packs are
    consecutive and land in the same step.

    Raises ValueError naming the sample index and its cost when one sample alone exceeds a budget.
    """
    tok, vis = _validate(lengths, vision_costs, max_tokens, max_vision)
    if window <= 0:
        raise ValueError(f"window={window} must be positive")
    rng = np.random.default_rng([seed, epoch])
    grouped = groups is not None and group_size > 1
    if grouped:
        order, bounds = grouped_chunks(groups, group_size, rng)
    else:
        order = rng.permutation(len(tok))
        bounds = np.r_[np.arange(0, len(order), window), len(order)]
    key = tok / max_tokens + vis / max_vision
    out_order, out_sizes = _Chunks(), _Chunks()
    # Open packs: members and free room in both budgets. Nearly empty packs left at a window's end
    # stay open into the next window, so the epoch has a handful of small packs instead of a few per
    # window (a small pack makes its rank idle for most of a step).
    members: list[list[int]] = []
    free_tok: list[int] = []
    free_vis: list[int] = []
    full_tok, full_vis = float(max_tokens), float(max_vision)
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        chunk = order[start:end]
        # Stable sort on the shuffled order: ties keep the seeded order, so the plan stays deterministic.
        chunk = chunk[np.argsort(-key[chunk], kind="stable")]
        _first_fit(chunk, tok[chunk], vis[chunk], max_tokens, max_vision, members, free_tok, free_vis)
        # Carried: the fuller of the two budgets under CARRY_BELOW_FILL.
        carry = [not grouped and 1 - ft / full_tok < CARRY_BELOW_FILL and 1 - fv / full_vis < CARRY_BELOW_FILL
                 for ft, fv in zip(free_tok, free_vis)]
        closed = [m for m, c in zip(members, carry) if not c]
        out_order.extend(chain.from_iterable(closed))
        out_sizes.extend([len(m) for m in closed])
        members = [m for m, c in zip(members, carry) if c]
        free_tok = [f for f, c in zip(free_tok, carry) if c]
        free_vis = [f for f, c in zip(free_vis, carry) if c]
    out_order.extend(chain.from_iterable(members))
    out_sizes.extend([len(m) for m in members])
    packs = Packs(out_order.array(), np.r_[0, np.cumsum(out_sizes.array())].astype(np.int64))
    return packs if grouped else packs.take(rng.permutation(len(packs)))


@dataclass(eq=False)
class ShardPlan:
    """Packs per step per rank: ``steps[s, r]`` holds the indices (into the epoch's :class:`Packs`) of
    rank r's packs at step s, a ``(steps, world_size, packs_per_rank_per_step)`` int64 array.

    ``token_ratio[s]`` / ``vision_ratio[s]``: max over min per-rank load of step s (1.0 = perfect;
    ``inf`` when a rank has none of that load while another has some) — log them to watch balance.
    ``dropped``: the ``len(packs) % (world_size * packs_per_rank_per_step)`` smallest packs (sorted
    indices), left out so every rank runs the same number of micro-batches (their samples come back
    in other epochs' plans, as :class:`~vlmtrain.data.loader.EpochPlan` does with its remainder).
    """

    steps: np.ndarray
    token_ratio: np.ndarray
    vision_ratio: np.ndarray
    dropped: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardPlan):
            return NotImplemented
        return all(np.array_equal(getattr(self, f), getattr(other, f))
                   for f in ("steps", "token_ratio", "vision_ratio", "dropped"))


def _ratios(loads: np.ndarray) -> np.ndarray:
    """Per row of ``loads`` (steps x ranks): max / min; 1.0 when nobody has any of this load."""
    hi, lo = loads.max(axis=1), loads.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(lo > 0, hi / lo, np.inf)
    return np.where(hi == 0, 1.0, ratio)


def _window_means(values: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Each value's window mean (``window``: sorted window ids). The values are whole numbers, so
    the sums are exact and equal ``values[w].mean()`` bit for bit."""
    starts = np.flatnonzero(np.r_[True, window[1:] != window[:-1]])
    counts = np.diff(np.r_[starts, len(values)])
    return np.repeat(np.add.reduceat(values, starts) / counts, counts)


def _lpt(t: list[float], v: list[float], n_bins: int, cap: int) -> tuple[list[int], list[float], list[float]]:
    """Greedy two-dimensional LPT: each item (in order) to the bin with room whose larger load after
    adding it is smallest, ties to the lowest bin. Returns each item's bin and the bins' loads.

    Only the bins partly filled and the lowest empty bin are scored: every empty bin scores the same
    and bins start filling in index order, so that is the argmin over all bins."""
    load_t, load_v, count = [0.0] * n_bins, [0.0] * n_bins, [0] * n_bins
    partial: list[int] = []  # bins holding items with room for more, in index order (all below `empty`)
    empty = 0
    out = []
    for tj, vj in zip(t, v):
        best, score = -1, float("inf")
        for b in partial:
            s, sv = load_t[b] + tj, load_v[b] + vj
            if sv > s:
                s = sv
            if s < score:
                best, score = b, s
        if empty < n_bins and (tj if tj >= vj else vj) < score:
            best = empty
            empty += 1
            if cap > 1:
                partial.append(best)
        elif count[best] + 1 == cap:
            partial.remove(best)
        count[best] += 1
        load_t[best] += tj
        load_v[best] += vj
        out.append(best)
    return out, load_t, load_v


def shard_packs(packs: Union[Packs, Sequence[Sequence[int]]], lengths: Union[np.ndarray, Sequence[int]],
                vision_costs: Union[np.ndarray, Sequence[int]], world_size: int, packs_per_rank_per_step: int,
                window_steps: int = 16) -> ShardPlan:
    """Assign packs to (step, rank), each rank getting exactly ``packs_per_rank_per_step`` per step.

    Equal pack counts per rank keep DDP / FSDP collectives in lockstep; the work in them is balanced
    in windows of ``window_steps`` steps (their packs are consecutive in the already shuffled order):

    1. every (step, rank) slot of the window is a bin; packs, largest combined cost first, go to the
       bin whose larger normalised load (tokens or vision, each as a multiple of the window's mean
       pack) stays smallest — greedy LPT on a two-dimensional cost, so neither budget is traded away
       for the other;
    2. bins sorted by load are cut into consecutive groups of ``world_size``: bins of similar load
       share a step, which is what balances a step even with one pack per rank;
    3. the window's steps keep the epoch order of their earliest pack, so step time does not ramp.

    ``window_steps=1`` reduces to plain per-step LPT. ``packs``: :class:`Packs` or a list of sample
    index lists. Pure function of its arguments.
    """
    if world_size <= 0 or packs_per_rank_per_step <= 0 or window_steps <= 0:
        raise ValueError(f"world_size={world_size}, packs_per_rank_per_step={packs_per_rank_per_step} and "
                         f"window_steps={window_steps} must be positive")
    if len(lengths) != len(vision_costs):
        raise ValueError(f"{len(lengths)} lengths but {len(vision_costs)} vision costs")
    packs = packs if isinstance(packs, Packs) else Packs.from_lists(packs)
    ppr = packs_per_rank_per_step
    per_step = world_size * ppr
    n_steps = len(packs) // per_step
    if n_steps == 0:  # nothing fills a step: every pack is dropped
        empty = np.zeros(0)
        return ShardPlan(np.zeros((0, world_size, ppr), dtype=np.int64), empty, empty.copy(),
                         np.arange(len(packs), dtype=np.int64))
    pack_tok = packs.sums(lengths).astype(np.float64)
    pack_vis = packs.sums(vision_costs).astype(np.float64)
    # The remainder that fills no step is dropped; drop the *smallest* packs (the epoch's tail packs
    # from plan_packs) rather than the last ones, since a near-empty pack would idle its rank.
    size = pack_tok / max(pack_tok.mean(), 1e-12) + pack_vis / max(pack_vis.mean(), 1e-12)
    dropped = np.sort(np.argsort(size, kind="stable")[:len(packs) - n_steps * per_step])
    keep = np.ones(len(packs), dtype=bool)
    keep[dropped] = False
    scheduled = np.flatnonzero(keep)
    # Loads in units of the window's mean pack; an all-zero dimension (text only) stays zero.
    window = np.arange(len(scheduled)) // (window_steps * per_step)
    t = pack_tok[scheduled] / np.maximum(_window_means(pack_tok[scheduled], window), 1e-12)
    v = pack_vis[scheduled] / np.maximum(_window_means(pack_vis[scheduled], window), 1e-12)
    by_cost = np.lexsort((-(t + v), window))  # per window, largest first; ties in epoch order
    bin_of, load = _Chunks(), _Chunks(np.float64)
    for w0 in range(0, n_steps, window_steps):
        n_win = min(window_steps, n_steps - w0)
        items = by_cost[w0 * per_step:(w0 + n_win) * per_step]
        bins, load_t, load_v = _lpt(t[items].tolist(), v[items].tolist(), n_win * world_size, ppr)
        bin_of.extend([w0 * world_size + b for b in bins])
        load.extend([a + b for a, b in zip(load_t, load_v)])
    # Bins (each ppr packs, in the order LPT gave them) sorted by load inside their window, then cut
    # into steps of world_size bins; the window's steps in the order of their earliest pack.
    bins = scheduled[by_cost][np.argsort(bin_of.array(), kind="stable")].reshape(-1, ppr)
    bin_window = np.arange(len(bins)) // (window_steps * world_size)
    steps = bins[np.lexsort((load.array(), bin_window))].reshape(n_steps, world_size, ppr)
    steps = steps[np.lexsort((steps.reshape(n_steps, -1).min(axis=1), np.arange(n_steps) // window_steps))]
    return ShardPlan(steps, _ratios(pack_tok[steps].sum(axis=2)), _ratios(pack_vis[steps].sum(axis=2)), dropped)


def pack_position_ids(doc_lengths: Sequence[int]) -> torch.Tensor:
    """Position ids ``(1, L)`` that restart at 0 for every document of a pack (RoPE sees each
    document at the positions it would have alone)."""
    return torch.cat([torch.arange(int(n), dtype=torch.long) for n in doc_lengths]).unsqueeze(0)


def pack_labels(labels_per_doc: Sequence[Sequence[int]]) -> torch.Tensor:
    """Unshifted labels ``(1, L)`` of a pack, with each document's first label set to IGNORE_INDEX.

    HF shifts labels inside the loss: the label at a document's first token is predicted from the
    *previous* document's last token, a cross-document target that must not be trained.
    """
    out: list[int] = []
    for labels in labels_per_doc:
        out.extend([IGNORE_INDEX, *labels[1:]] if len(labels) else [])
    return torch.tensor(out, dtype=torch.long).unsqueeze(0)


def padding_efficiency(real_tokens: int, computed_tokens: int) -> float:
    """Share of computed token positions that carry real data (1.0 = no padding)."""
    if computed_tokens <= 0 or real_tokens < 0 or real_tokens > computed_tokens:
        raise ValueError(f"need 0 <= real_tokens ({real_tokens}) <= computed_tokens ({computed_tokens}), "
                         f"computed_tokens > 0")
    return real_tokens / computed_tokens
