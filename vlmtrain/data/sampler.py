"""Step plans: which samples each rank trains on at step k, as a pure function of (seed, epoch, world size).

Two plans share one interface (``step(k) -> StepSpec``, ``epoch_of(k)``, ``steps_per_epoch``):

- :class:`SampleStepPlan` — padded batches of ``train.batch_size`` samples per step (the epoch order of
  :class:`~vlmtrain.data.loader.EpochPlan`, split across ranks, then into micro-batches);
- :class:`PackedStepPlan` — packs planned per epoch *before* sharding (``packing.plan_packs``, an LLM
  token budget and a vision budget), dealt to (step, rank) by ``packing.shard_packs`` so every rank
  gets near-equal tokens and vision patches, then split into micro-batches of whole packs.

Nothing is replayed on resume: step k is computed from k directly (one plan per epoch, cached).
Plans work on per-sample numpy arrays (:func:`sample_arrays`), never on a Python object per sample,
and :func:`make_plan` can keep a packed plan's expensive first epoch on disk for warm starts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from vlmtrain.data.grouping import frame_groups
from vlmtrain.data.loader import EpochPlan
from vlmtrain.data.packing import (CARRY_BELOW_FILL, DEFAULT_WINDOW, IGNORE_INDEX, Packs, ShardPlan, plan_packs,
                                   shard_packs)

log = logging.getLogger(__name__)

# Steps per epoch of a packed plan: the first epoch's count, less this share. Pack counts vary by a
# few packs between epochs; a fixed step count keeps step -> (epoch, position) O(1) in k.
EPOCH_STEP_MARGIN = 0.01
# A vision budget of 0 means "none": a budget no pack can reach.
NO_VISION_BUDGET = 1 << 62
# Part of every plan cache key: bump it whenever packing or sharding would give other results.
PLAN_VERSION = 1

Ints = Union[np.ndarray, Sequence[int]]


def sample_arrays(samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, labelled tokens, image slots) per sample as int64 arrays.

    ``samples`` is a table with those arrays as ``lengths`` / ``label_counts`` / ``num_frames``
    (the memory-mapped index: used as they are), or a sequence of ``TokenizedSample`` (counted here).
    A label at position 0 is not counted: nothing predicts the first token, and packed it is dropped
    too (``loader.collate_rows``: it would be predicted across documents).
    """
    names = ("lengths", "label_counts", "num_frames")
    if all(hasattr(samples, a) for a in names):
        lengths, labels, frames = (np.asarray(getattr(samples, a), dtype=np.int64) for a in names)
        return lengths, labels, frames
    n = len(samples)
    lengths = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=n)
    labels = np.fromiter((sum(1 for x in s.labels[1:] if x != IGNORE_INDEX) for s in samples), dtype=np.int64, count=n)
    frames = np.fromiter((len(s.frames) for s in samples), dtype=np.int64, count=n)
    return lengths, labels, frames


@dataclass
class StepSpec:
    """What one rank trains on at one step."""

    micro: list[list[list[int]]]  # micro-batches -> rows -> sample indices (unpacked: one sample per row)
    packed: bool
    label_tokens: int  # labelled tokens of the whole step, every rank and micro-batch (the loss normaliser)
    token_ratio: float = 1.0  # max / min LLM tokens over ranks
    vision_ratio: float = 1.0  # max / min vision cost over ranks


def _check_split(what: str, total: int, world_size: int, grad_accum: int) -> None:
    if total % (world_size * grad_accum):
        raise ValueError(f"{what}={total} is not a multiple of world size {world_size} x grad_accum {grad_accum}")


class SampleStepPlan:
    """Padded batches: step k is the k-th ``batch_size`` slice of the epoch order; rank r takes the r-th
    contiguous share, cut into ``grad_accum`` micro-batches."""

    packed = False

    def __init__(self, label_counts: Ints, batch_size: int, grad_accum: int, seed: int,
                 world_size: int = 1, rank: int = 0, groups: Optional[np.ndarray] = None, group_size: int = 0):
        _check_split("train.batch_size", batch_size, world_size, grad_accum)
        self.order = EpochPlan(len(label_counts), batch_size, seed, groups, group_size)
        self.labels = np.asarray(label_counts, dtype=np.int64)
        self.accum, self.world, self.rank = grad_accum, world_size, rank
        self.steps_per_epoch = self.order.batches_per_epoch

    def step(self, k: int) -> StepSpec:
        """Step k (from 0): O(1) in k."""
        idx = self.order.batch_indices(k)
        per_rank = len(idx) // self.world
        mine = idx[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()
        size = per_rank // self.accum
        micro = [[[i] for i in mine[j * size:(j + 1) * size]] for j in range(self.accum)]
        return StepSpec(micro, False, int(self.labels[idx].sum()))

    def epoch_of(self, k: int) -> float:
        """Fractional epoch reached after ``k`` steps."""
        return self.order.epoch_of(k)


class PackedStepPlan:
    """Packs under two budgets, balanced across ranks; see the module docstring.

    Packs per step: ``world_size x grad_accum x rows`` where ``rows`` (packs per micro-batch) is chosen
    so that a step holds about ``batch_size`` samples on average (from the first epoch's plan). Steps
    per epoch are fixed from the first epoch (less ``EPOCH_STEP_MARGIN``): the packs left over in an
    epoch are seen in other epochs' plans, as the padded plan does with its remainder.

    ``first_epoch``: epoch 0's packs and shard plan when already known (``make_plan``'s plan cache);
    they must be what this plan would compute.
    """

    packed = True

    def __init__(self, lengths: Ints, vision_costs: Ints, label_counts: Ints,
                 max_tokens: int, max_vision: int, batch_size: int, grad_accum: int, seed: int,
                 world_size: int = 1, rank: int = 0, groups: Optional[np.ndarray] = None, group_size: int = 0,
                 one_row: bool = False, first_epoch: Optional[tuple[Packs, ShardPlan]] = None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.costs = np.asarray(vision_costs, dtype=np.int64)
        self.groups, self.group_size, self.one_row = groups, group_size, one_row
        self.grouped = groups is not None and group_size > 1
        self.labels = np.asarray(label_counts, dtype=np.int64)
        self.max_tokens, self.max_vision = max_tokens, (max_vision or NO_VISION_BUDGET)
        self.seed, self.accum, self.world, self.rank = seed, grad_accum, world_size, rank
        packs0 = first_epoch[0] if first_epoch is not None else self._packs(0)
        per_pack = len(self.lengths) / max(len(packs0), 1)
        self.rows = max(1, round(batch_size / (world_size * grad_accum * per_pack)))
        per_step = world_size * grad_accum * self.rows
        if len(packs0) < per_step:
            raise ValueError(f"{len(self.lengths)} samples make {len(packs0)} packs, fewer than one step's "
                             f"{per_step} (world {world_size} x grad_accum {grad_accum} x {self.rows} rows)")
        margin = math.ceil(len(packs0) * EPOCH_STEP_MARGIN)  # in packs, so small epochs lose no extra step
        self.steps_per_epoch = max(1, (len(packs0) - margin) // per_step)
        # Per epoch: packs, shard plan and label tokens per pack (at most two epochs kept).
        self._cache: dict[int, tuple[Packs, ShardPlan, np.ndarray]] = {}
        self._first_packs: Optional[Packs] = packs0  # epoch 0's packs, planned once
        if first_epoch is not None:
            shard = first_epoch[1]
            if shard.steps.shape[1:] != (world_size, grad_accum * self.rows):
                raise ValueError(f"epoch 0's shard plan has steps of shape {shard.steps.shape[1:]}, this plan "
                                 f"needs {(world_size, grad_accum * self.rows)}")
            self._cache[0] = (packs0, shard, packs0.sums(self.labels))
            self._first_packs = None
        log.info("packing: %d samples -> %d packs (%.1f samples, %.1f%% of %d tokens each), %d packs x %d ranks "
                 "per step, %d steps per epoch", len(self.lengths), len(packs0), per_pack,
                 100 * int(self.lengths.sum()) / max(len(packs0), 1) / max_tokens, max_tokens,
                 self.rows * grad_accum, world_size, self.steps_per_epoch)

    def _packs(self, epoch: int) -> Packs:
        return plan_packs(self.lengths, self.costs, self.max_tokens, self.max_vision, self.seed, epoch,
                          groups=self.groups, group_size=self.group_size)

    def _epoch(self, epoch: int) -> tuple[Packs, ShardPlan, np.ndarray]:
        if epoch not in self._cache:
            packs = self._first_packs if epoch == 0 and self._first_packs is not None else self._packs(epoch)
            self._first_packs = None
            # Grouped packs are consecutive in the plan: balance step by step so a group stays in its step.
            shard = shard_packs(packs, self.lengths, self.costs, self.world, self.accum * self.rows,
                                window_steps=1 if self.grouped else 16)
            self._cache = {e: v for e, v in self._cache.items() if e == epoch - 1}  # keep at most two epochs
            self._cache[epoch] = (packs, shard, packs.sums(self.labels))
        return self._cache[epoch]

    def epoch_plan(self, epoch: int) -> tuple[Packs, ShardPlan]:
        """The packs of ``epoch`` and their shard plan (computed once, cached)."""
        packs, shard, _ = self._epoch(epoch)
        return packs, shard

    def step(self, k: int) -> StepSpec:
        """Step k (from 0): one epoch plan computed (and cached), nothing replayed."""
        epoch, pos = divmod(k, self.steps_per_epoch)
        packs, shard, pack_labels = self._epoch(epoch)
        pos %= len(shard.steps)  # only if this epoch made fewer steps than the margin allows (never seen)
        ranks = shard.steps[pos]  # (world, packs per rank)
        mine = ranks[self.rank].tolist()
        micro = [[packs[j] for j in mine[m * self.rows:(m + 1) * self.rows]] for m in range(self.accum)]
        if self.one_row:  # per-document attention: a micro-batch's packs end to end, no row padding
            micro = [[[i for pack in rows for i in pack]] for rows in micro]
        return StepSpec(micro, True, int(pack_labels[ranks].sum()), float(shard.token_ratio[pos]),
                        float(shard.vision_ratio[pos]))

    def epoch_of(self, k: int) -> float:
        """Fractional epoch reached after ``k`` steps."""
        return k / self.steps_per_epoch


def micro_batch_budget(lengths: Ints, costs: Ints, samples_per_pack: float, max_vision: int,
                       seed: int, floor: int, groups: Optional[np.ndarray] = None, group_size: int = 0) -> int:
    """The LLM-token budget at which ``plan_packs`` makes packs of ``samples_per_pack`` samples on average
    (at least ``floor``, the longest sample): a first guess from the mean length, corrected twice by the
    packs the guess really makes (first-fit leaves a few percent of each pack empty). Grouped, packs
    never span chunks, so ``group_size`` longest samples (a whole chunk in one pack) is the most needed."""
    lengths = np.asarray(lengths, dtype=np.int64)
    target = max(1, round(len(lengths) / samples_per_pack))
    cap = group_size * floor if groups is not None and group_size > 1 else None
    budget = max(floor, round(samples_per_pack * float(np.mean(lengths))))
    for _ in range(2):
        budget = min(budget, cap) if cap else budget
        made = len(plan_packs(lengths, costs, budget, max_vision, seed, 0, groups=groups, group_size=group_size))
        budget = max(floor, round(budget * made / target))
    return min(budget, cap) if cap else budget


def plan_key(lengths: np.ndarray, costs: np.ndarray, label_counts: np.ndarray, groups: Optional[np.ndarray],
             seed: int, max_tokens: int, max_vision: int, batch_size: int, grad_accum: int, world_size: int,
             one_row: bool, group_size: int) -> str:
    """Hex blake2b (16 bytes) of everything a packed plan's first epoch depends on (``max_tokens`` 0:
    the automatic budget), ``PLAN_VERSION`` and the packing constants. Not the rank: every rank plans
    the same."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((PLAN_VERSION, DEFAULT_WINDOW, CARRY_BELOW_FILL, EPOCH_STEP_MARGIN, len(lengths), int(seed),
                   int(max_tokens), int(max_vision), int(batch_size), int(grad_accum), int(world_size), bool(one_row),
                   int(group_size), groups is not None)).encode())
    for values in (lengths, costs, label_counts) + ((groups,) if groups is not None else ()):
        h.update(np.ascontiguousarray(values, dtype="<i8"))
    return h.hexdigest()


def _save_plan(path: Path, budget: int, packs: Packs, shard: ShardPlan) -> None:
    """Write a plan cache file atomically (a temporary file in the same folder, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, version=np.int64(PLAN_VERSION), budget=np.int64(budget), order=packs.order,
                     bounds=packs.bounds, steps=shard.steps, token_ratio=shard.token_ratio,
                     vision_ratio=shard.vision_ratio, dropped=shard.dropped)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_plan(path: Path, num_samples: int) -> tuple[int, Packs, ShardPlan]:
    """(budget, epoch 0's packs, its shard plan) from a plan cache file; ValueError when it does not
    hold a plan of ``num_samples`` samples."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in ("version", "budget", "order", "bounds", "steps", "token_ratio",
                                    "vision_ratio", "dropped")}
    packs = Packs(arrays["order"].astype(np.int64), arrays["bounds"].astype(np.int64))
    shard = ShardPlan(arrays["steps"].astype(np.int64), arrays["token_ratio"].astype(np.float64),
                      arrays["vision_ratio"].astype(np.float64), arrays["dropped"].astype(np.int64))
    b, steps = packs.bounds, shard.steps
    ok = (int(arrays["version"]) == PLAN_VERSION and packs.order.shape == (num_samples,) and b.ndim == 1
          and len(b) >= 1 and b[0] == 0 and b[-1] == num_samples and bool(np.all(np.diff(b) > 0))
          and steps.ndim == 3 and shard.token_ratio.shape == shard.vision_ratio.shape == (len(steps),)
          and (steps.size == 0 or (steps.min() >= 0 and steps.max() < len(packs))))
    if not ok:
        raise ValueError("not a plan of these samples")
    return int(arrays["budget"]), packs, shard


def _frame_lists(samples) -> list:
    """Every sample's frame ids (episode grouping only)."""
    return samples.frame_lists() if hasattr(samples, "frame_lists") else [s.frames for s in samples]


def make_plan(dcfg, tcfg, samples, patches_per_frame: int, seed: int, world_size: int = 1, rank: int = 0,
              cached: bool = False, one_row: bool = False,
              cache_dir: Optional[Union[str, os.PathLike]] = None) -> Union[SampleStepPlan, PackedStepPlan]:
    """The run's step plan from ``data.*`` and ``train.*`` (a builder: the configs stop here).

    ``samples``: a sample table with per-sample arrays or a sequence of ``TokenizedSample``
    (:func:`sample_arrays`). The vision cost of a sample is its image slots x ``patches_per_frame``
    (what the encoder would run without de-duplication or cache: the plan must not depend on the
    cache's state). ``data.episode_group`` keeps decisions of one episode together
    (``data/grouping.py``); ``cached``: whether features come from a cache (grouping then saves
    nothing: it is not applied).

    ``one_row`` (per-document attention, where a micro-batch is one row however long): a packed
    micro-batch's packs are laid end to end in one row. Packed, ``data.max_pack_tokens=0`` then means
    one pack per micro-batch, budgeted so that a step holds
    ``train.batch_size`` samples on average (:func:`micro_batch_budget`: as many optimizer steps per
    epoch as padded batches); otherwise packs of ``data.max_length`` tokens.

    ``cache_dir``: a folder where a packed plan's expensive part (the automatic budget, epoch 0's
    packs and shard plan for every rank) is kept as ``plan-<key>.npz`` (:func:`plan_key`) and read
    back instead of recomputed; an unreadable file is replaced.
    """
    group_size = 1 if cached else dcfg.episode_group
    groups = frame_groups(_frame_lists(samples)) if group_size > 1 else None
    if groups is not None:
        log.info("episode grouping: %d groups of samples sharing frames, chunks of %d per step (data.episode_group)",
                 int(groups.max()) + 1, group_size)
    elif dcfg.episode_group > 1:
        log.info("episode grouping off: features come from the cache, so grouping would save no encoder work")
    lengths, labels, frames = sample_arrays(samples)
    if not dcfg.packing:
        return SampleStepPlan(labels, tcfg.batch_size, tcfg.grad_accum, seed, world_size, rank, groups, group_size)
    costs = frames * patches_per_frame
    max_vision = dcfg.max_pack_vision or NO_VISION_BUDGET
    auto = dcfg.max_pack_tokens <= 0 and one_row
    budget = dcfg.max_pack_tokens if dcfg.max_pack_tokens > 0 else (0 if auto else dcfg.max_length)

    def build(budget: int, first_epoch: Optional[tuple[Packs, ShardPlan]] = None) -> PackedStepPlan:
        return PackedStepPlan(lengths, costs, labels, budget, max_vision, tcfg.batch_size, tcfg.grad_accum, seed,
                              world_size, rank, groups, group_size, one_row, first_epoch)

    path = None
    if cache_dir is not None:
        key = plan_key(lengths, costs, labels, groups, seed, budget, max_vision, tcfg.batch_size, tcfg.grad_accum,
                       world_size, one_row, group_size)
        path = Path(cache_dir) / f"plan-{key}.npz"
        if path.exists():
            try:
                cached_budget, packs, shard = _load_plan(path, len(lengths))
                plan = build(cached_budget, (packs, shard))
                log.info("packing: plan read from %s", path)
                return plan
            except Exception as e:  # a damaged or foreign file: planned again and rewritten
                log.warning("plan cache %s unreadable (%s: %s): planning again", path, type(e).__name__, e)
    if auto:
        per_micro = tcfg.batch_size / (world_size * tcfg.grad_accum)
        budget = micro_batch_budget(lengths, costs, per_micro, max_vision, seed, int(lengths.max()), groups, group_size)
    plan = build(budget)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_plan(path, budget, *plan.epoch_plan(0))
        except OSError as e:
            log.warning("plan cache %s not written (%s)", path, e)
    return plan
