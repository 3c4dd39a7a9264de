"""Step plans: which samples each rank trains on at step k, as a pure function of (seed, epoch, world size).

Two plans share one interface (``step(k) -> StepSpec``, ``epoch_of(k)``, ``steps_per_epoch``):

- :class:`SampleStepPlan` — padded batches of ``train.batch_size`` samples per step (the epoch order of
  :class:`~vlmtrain.data.loader.EpochPlan`, split across ranks, then into micro-batches);
- :class:`PackedStepPlan` — packs planned per epoch *before* sharding (``packing.plan_packs``, an LLM
  token budget and a vision budget), dealt to (step, rank) by ``packing.shard_packs`` so every rank
  gets near-equal tokens and vision patches, then split into micro-batches of whole packs.

Nothing is replayed on resume: step k is computed from k directly (one plan per epoch, cached).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from vlmtrain.data.grouping import frame_groups
from vlmtrain.data.loader import EpochPlan
from vlmtrain.data.packing import IGNORE_INDEX, plan_packs, shard_packs

log = logging.getLogger(__name__)

# Steps per epoch of a packed plan: the first epoch's count, less this share. Pack counts vary by a
# few packs between epochs; a fixed step count keeps step -> (epoch, position) O(1) in k.
EPOCH_STEP_MARGIN = 0.01
# A vision budget of 0 means "none": a budget no pack can reach.
NO_VISION_BUDGET = 1 << 62


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

    def __init__(self, label_counts: Sequence[int], batch_size: int, grad_accum: int, seed: int,
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
    """

    packed = True

    def __init__(self, lengths: Sequence[int], vision_costs: Sequence[int], label_counts: Sequence[int],
                 max_tokens: int, max_vision: int, batch_size: int, grad_accum: int, seed: int,
                 world_size: int = 1, rank: int = 0, groups: Optional[np.ndarray] = None, group_size: int = 0,
                 one_row: bool = False):
        self.lengths, self.costs = list(lengths), list(vision_costs)
        self.groups, self.group_size, self.one_row = groups, group_size, one_row
        self.grouped = groups is not None and group_size > 1
        self.labels = np.asarray(label_counts, dtype=np.int64)
        self.max_tokens, self.max_vision = max_tokens, (max_vision or NO_VISION_BUDGET)
        self.seed, self.accum, self.world, self.rank = seed, grad_accum, world_size, rank
        packs0 = self._packs(0)
        per_pack = len(self.lengths) / max(len(packs0), 1)
        self.rows = max(1, round(batch_size / (world_size * grad_accum * per_pack)))
        per_step = world_size * grad_accum * self.rows
        if len(packs0) < per_step:
            raise ValueError(f"{len(self.lengths)} samples make {len(packs0)} packs, fewer than one step's "
                             f"{per_step} (world {world_size} x grad_accum {grad_accum} x {self.rows} rows)")
        margin = math.ceil(len(packs0) * EPOCH_STEP_MARGIN)  # in packs, so small epochs lose no extra step
        self.steps_per_epoch = max(1, (len(packs0) - margin) // per_step)
        self._cache: dict[int, tuple[list[list[int]], object]] = {}
        self._first_packs: Optional[list[list[int]]] = packs0  # epoch 0's packs, planned once
        log.info("packing: %d samples -> %d packs (%.1f samples, %.1f%% of %d tokens each), %d packs x %d ranks "
                 "per step, %d steps per epoch", len(self.lengths), len(packs0), per_pack,
                 100 * sum(self.lengths) / max(len(packs0), 1) / max_tokens, max_tokens, self.rows * grad_accum,
                 world_size, self.steps_per_epoch)

    def _packs(self, epoch: int) -> list[list[int]]:
        return plan_packs(self.lengths, self.costs, self.max_tokens, self.max_vision, self.seed, epoch,
                          groups=self.groups, group_size=self.group_size)

    def _epoch(self, epoch: int):
        if epoch not in self._cache:
            packs = self._first_packs if epoch == 0 and self._first_packs is not None else self._packs(epoch)
            self._first_packs = None
            # Grouped packs are consecutive in the plan: balance step by step so a group stays in its step.
            shard = shard_packs(packs, self.lengths, self.costs, self.world, self.accum * self.rows,
                                window_steps=1 if self.grouped else 16)
            self._cache = {e: v for e, v in self._cache.items() if e == epoch - 1}  # keep at most two epochs
            self._cache[epoch] = (packs, shard)
        return self._cache[epoch]

    def step(self, k: int) -> StepSpec:
        """Step k (from 0): one epoch plan computed (and cached), nothing replayed."""
        epoch, pos = divmod(k, self.steps_per_epoch)
        packs, shard = self._epoch(epoch)
        pos %= len(shard.steps)  # only if this epoch made fewer steps than the margin allows (never seen)
        ranks = shard.steps[pos]
        mine = ranks[self.rank]
        micro = [[packs[j] for j in mine[m * self.rows:(m + 1) * self.rows]] for m in range(self.accum)]
        if self.one_row:  # per-document attention: a micro-batch's packs end to end, no row padding
            micro = [[[i for pack in rows for i in pack]] for rows in micro]
        labels = int(sum(self.labels[packs[j]].sum() for r in ranks for j in r))
        return StepSpec(micro, True, labels, shard.token_ratio[pos], shard.vision_ratio[pos])

    def epoch_of(self, k: int) -> float:
        """Fractional epoch reached after ``k`` steps."""
        return k / self.steps_per_epoch


def micro_batch_budget(lengths: Sequence[int], costs: Sequence[int], samples_per_pack: float, max_vision: int,
                       seed: int, floor: int, groups: Optional[np.ndarray] = None, group_size: int = 0) -> int:
    """The LLM-token budget at which ``plan_packs`` makes packs of ``samples_per_pack`` samples on average
    (at least ``floor``, the longest sample): a first guess from the mean length, corrected twice by the
    packs the guess really makes (first-fit leaves a few percent of each pack empty). Grouped, packs
    never span chunks, so ``group_size`` longest samples (a whole chunk in one pack) is the most needed."""
    target = max(1, round(len(lengths) / samples_per_pack))
    cap = group_size * floor if groups is not None and group_size > 1 else None
    budget = max(floor, round(samples_per_pack * float(np.mean(lengths))))
    for _ in range(2):
        budget = min(budget, cap) if cap else budget
        made = len(plan_packs(lengths, costs, budget, max_vision, seed, 0, groups=groups, group_size=group_size))
        budget = max(floor, round(budget * made / target))
    return min(budget, cap) if cap else budget


def make_plan(dcfg, tcfg, samples, patches_per_frame: int, seed: int, world_size: int = 1, rank: int = 0,
              cached: bool = False, one_row: bool = False):
    """The run's step plan from ``data.*`` and ``train.*`` (a builder: the configs stop here).

    The vision cost of a sample is its image slots x ``patches_per_frame`` (what the encoder would
    run without de-duplication or cache: the plan must not depend on the cache's state).
    ``data.episode_group`` keeps decisions of one episode together (``data/grouping.py``); ``cached``:
    whether features come from a cache (grouping then saves nothing: it is not applied).

    ``one_row`` (per-document attention, where a micro-batch is one row however long): a packed
    micro-batch's packs are laid end to end in one row. Packed, ``data.max_pack_tokens=0`` then means
    one pack per micro-batch, budgeted so that a step holds
    ``train.batch_size`` samples on average (:func:`micro_batch_budget`: as many optimizer steps per
    epoch as padded batches); otherwise packs of ``data.max_length`` tokens."""
    group_size = 1 if cached else dcfg.episode_group
    groups = frame_groups([s.frames for s in samples]) if group_size > 1 else None
    if groups is not None:
        log.info("episode grouping: %d groups of samples sharing frames, chunks of %d per step (data.episode_group)",
                 int(groups.max()) + 1, group_size)
    elif dcfg.episode_group > 1:
        log.info("episode grouping off: features come from the cache, so grouping would save no encoder work")
    # A label at position 0 is never a target (nothing predicts the first token): not counted. Packed,
    # it is dropped too (collate_rows): it would be predicted across documents.
    labels = [sum(1 for x in s.labels[1:] if x != IGNORE_INDEX) for s in samples]
    if not dcfg.packing:
        return SampleStepPlan(labels, tcfg.batch_size, tcfg.grad_accum, seed, world_size, rank, groups, group_size)
    lengths = [len(s.input_ids) for s in samples]
    costs = [len(s.frames) * patches_per_frame for s in samples]
    budget = dcfg.max_pack_tokens
    if budget <= 0 and one_row:
        per_micro = tcfg.batch_size / (world_size * tcfg.grad_accum)
        budget = micro_batch_budget(lengths, costs, per_micro, dcfg.max_pack_vision or NO_VISION_BUDGET, seed,
                                    max(lengths), groups, group_size)
    return PackedStepPlan(lengths, costs, labels, budget if budget > 0 else dcfg.max_length, dcfg.max_pack_vision,
                          tcfg.batch_size, tcfg.grad_accum, seed, world_size, rank, groups, group_size, one_row)
