"""Packing planned before sharding: packs under two budgets, packs balanced across ranks, packed masks.

The plan is a pure function of its arguments (lengths, costs, seed, epoch), so every rank computes
the same plan without communication and a resumed run recomputes it instead of replaying a loader.

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
from typing import Optional, Sequence

import numpy as np
import torch

from vlmtrain.data.grouping import grouped_chunks
from vlmtrain.models.protocol import IGNORE_INDEX
DEFAULT_WINDOW = 512
# A pack whose fuller budget is below this share stays open into the next packing window.
CARRY_BELOW_FILL = 0.75


def _validate(lengths: Sequence[int], vision_costs: Sequence[int], max_tokens: int, max_vision: int) -> None:
    """Budgets positive, one cost per sample, and no sample that alone exceeds a budget."""
    if len(lengths) != len(vision_costs):
        raise ValueError(f"{len(lengths)} lengths but {len(vision_costs)} vision costs")
    if max_tokens <= 0 or max_vision <= 0:
        raise ValueError(f"budgets must be positive: max_tokens={max_tokens}, max_vision={max_vision} "
                         f"(for text-only data pass zero vision costs and max_vision=1)")
    for i, (n, v) in enumerate(zip(lengths, vision_costs)):
        if n <= 0 or v < 0:
            raise ValueError(f"sample {i}: length {n} must be > 0 and vision cost {v} >= 0")
        # Never truncate: a cut sample silently loses its answer tokens or image slots.
        if n > max_tokens:
            raise ValueError(f"sample {i}: {n} tokens > max_tokens={max_tokens}")
        if v > max_vision:
            raise ValueError(f"sample {i}: vision cost {v} > max_vision={max_vision}")


def plan_packs(lengths: Sequence[int], vision_costs: Sequence[int], max_tokens: int, max_vision: int,
               seed: int, epoch: int, window: int = DEFAULT_WINDOW,
               groups: Optional[np.ndarray] = None, group_size: int = 0) -> list[list[int]]:
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
    _validate(lengths, vision_costs, max_tokens, max_vision)
    if window <= 0:
        raise ValueError(f"window={window} must be positive")
    rng = np.random.default_rng([seed, epoch])
    grouped = groups is not None and group_size > 1
    if grouped:
        order, bounds = grouped_chunks(groups, group_size, rng)
    else:
        order = rng.permutation(len(lengths))
        bounds = np.r_[np.arange(0, len(order), window), len(order)]
    tok = np.asarray(lengths, dtype=np.int64)
    vis = np.asarray(vision_costs, dtype=np.int64)
    key = tok / max_tokens + vis / max_vision
    packs: list[list[int]] = []
    # Open packs: members and free room in both budgets. Nearly empty packs left at a window's end
    # stay open into the next window, so the epoch has a handful of small packs instead of a few per
    # window (a small pack makes its rank idle for most of a step).
    members: list[list[int]] = []
    free_tok = np.zeros(0, dtype=np.int64)
    free_vis = np.zeros(0, dtype=np.int64)
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        chunk = order[start:end]
        # Stable sort on the shuffled order: ties keep the seeded order, so the plan stays deterministic.
        chunk = chunk[np.argsort(-key[chunk], kind="stable")]
        # Room for the carried packs plus at most one new pack per sample of the window.
        n_open = len(members)
        free_tok = np.concatenate([free_tok, np.zeros(len(chunk), dtype=np.int64)])
        free_vis = np.concatenate([free_vis, np.zeros(len(chunk), dtype=np.int64)])
        for i in chunk.tolist():
            fits = np.flatnonzero((free_tok[:n_open] >= tok[i]) & (free_vis[:n_open] >= vis[i]))
            p = int(fits[0]) if len(fits) else n_open  # first fit, else open a new pack
            if p == n_open:
                members.append([])
                free_tok[p], free_vis[p] = max_tokens, max_vision
                n_open += 1
            members[p].append(i)
            free_tok[p] -= tok[i]
            free_vis[p] -= vis[i]
        fill = np.maximum(1 - free_tok[:n_open] / max_tokens, 1 - free_vis[:n_open] / max_vision)
        carry = (fill < CARRY_BELOW_FILL) & (not grouped)
        packs.extend(m for m, c in zip(members, carry) if not c)
        members = [m for m, c in zip(members, carry) if c]
        free_tok, free_vis = free_tok[:n_open][carry], free_vis[:n_open][carry]
    packs.extend(members)
    if grouped:
        return packs
    return [packs[j] for j in rng.permutation(len(packs))]


@dataclass
class ShardPlan:
    """Packs per step per rank: ``steps[s][r]`` lists indices into the ``packs`` list for rank r.

    ``token_ratio[s]`` / ``vision_ratio[s]``: max over min per-rank load of step s (1.0 = perfect;
    ``inf`` when a rank has none of that load while another has some) — log them to watch balance.
    ``dropped``: the ``len(packs) % (world_size * packs_per_rank_per_step)`` smallest packs, left out
    so every rank runs the same number of micro-batches (their samples come back in other epochs'
    plans, as :class:`~vlmtrain.data.loader.EpochPlan` does with its remainder).
    """

    steps: list[list[list[int]]]
    token_ratio: list[float]
    vision_ratio: list[float]
    dropped: list[int]


def _ratio(loads: np.ndarray) -> float:
    """max / min of per-rank loads; 1.0 when nobody has any of this load."""
    hi, lo = float(loads.max()), float(loads.min())
    if hi == 0:
        return 1.0
    return hi / lo if lo > 0 else float("inf")


def _pack_loads(packs: Sequence[Sequence[int]], values: Sequence[int]) -> np.ndarray:
    """Sum of ``values`` over the members of each pack."""
    arr = np.asarray(values, dtype=np.float64)
    return np.array([arr[list(p)].sum() for p in packs], dtype=np.float64)


def shard_packs(packs: Sequence[Sequence[int]], lengths: Sequence[int], vision_costs: Sequence[int],
                world_size: int, packs_per_rank_per_step: int, window_steps: int = 16) -> ShardPlan:
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

    ``window_steps=1`` reduces to plain per-step LPT. Pure function of its arguments.
    """
    if world_size <= 0 or packs_per_rank_per_step <= 0 or window_steps <= 0:
        raise ValueError(f"world_size={world_size}, packs_per_rank_per_step={packs_per_rank_per_step} and "
                         f"window_steps={window_steps} must be positive")
    if len(lengths) != len(vision_costs):
        raise ValueError(f"{len(lengths)} lengths but {len(vision_costs)} vision costs")
    if not packs:
        return ShardPlan([], [], [], [])
    pack_tok, pack_vis = _pack_loads(packs, lengths), _pack_loads(packs, vision_costs)
    ppr = packs_per_rank_per_step
    per_step = world_size * ppr
    n_steps = len(packs) // per_step
    # The remainder that fills no step is dropped; drop the *smallest* packs (the epoch's tail packs
    # from plan_packs) rather than the last ones, since a near-empty pack would idle its rank.
    size = pack_tok / max(pack_tok.mean(), 1e-12) + pack_vis / max(pack_vis.mean(), 1e-12)
    n_drop = len(packs) - n_steps * per_step
    dropped = sorted(np.argsort(size, kind="stable")[:n_drop].tolist())
    dropped_set = set(dropped)
    scheduled = np.array([j for j in range(len(packs)) if j not in dropped_set], dtype=np.int64)
    steps: list[list[list[int]]] = []
    for w0 in range(0, n_steps, window_steps):
        n_win = min(window_steps, n_steps - w0)
        ids = scheduled[w0 * per_step : (w0 + n_win) * per_step]
        # Loads in units of the window's mean pack; an all-zero dimension (text only) stays zero.
        t = pack_tok[ids] / max(pack_tok[ids].mean(), 1e-12)
        v = pack_vis[ids] / max(pack_vis[ids].mean(), 1e-12)
        n_bins = n_win * world_size
        load_t, load_v = np.zeros(n_bins), np.zeros(n_bins)
        count = np.zeros(n_bins, dtype=np.int64)
        bins: list[list[int]] = [[] for _ in range(n_bins)]
        for j in np.argsort(-(t + v), kind="stable"):
            # Full bins are excluded by an infinite score; ties go to the lowest bin (deterministic).
            score = np.where(count < ppr, np.maximum(load_t + t[j], load_v + v[j]), np.inf)
            b = int(np.argmin(score))
            bins[b].append(int(ids[j]))
            load_t[b] += t[j]
            load_v[b] += v[j]
            count[b] += 1
        by_load = np.argsort(load_t + load_v, kind="stable")
        window = [[bins[b] for b in by_load[k * world_size : (k + 1) * world_size]] for k in range(n_win)]
        window.sort(key=lambda ranks: min(j for r in ranks for j in r))
        steps.extend(window)
    token_ratio = [_ratio(np.array([pack_tok[r].sum() for r in ranks])) for ranks in steps]
    vision_ratio = [_ratio(np.array([pack_vis[r].sum() for r in ranks])) for ranks in steps]
    return ShardPlan(steps, token_ratio, vision_ratio, dropped)


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
