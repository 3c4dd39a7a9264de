"""Step plans on arrays (data/packing.py, data/sampler.py): the CSR packs, the vectorised shard plan
and the array-fed make_plan give exactly what the list implementation they replaced gave (a frozen
copy of it is below), and make_plan's plan cache reads back the same plan."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import pytest

from vlmtrain.data import sampler
from vlmtrain.data.grouping import frame_groups, grouped_chunks
from vlmtrain.data.packing import CARRY_BELOW_FILL, DEFAULT_WINDOW, IGNORE_INDEX, Packs, plan_packs, shard_packs
from vlmtrain.data.samples import history_indices
from vlmtrain.data.sampler import NO_VISION_BUDGET, make_plan, micro_batch_budget, plan_key, sample_arrays


# -- the reference: plan_packs / shard_packs / PackedStepPlan / make_plan on lists, as of commit 74f2d9f ------
def ref_plan_packs(lengths, vision_costs, max_tokens, max_vision, seed, epoch, window=DEFAULT_WINDOW,
                   groups=None, group_size=0) -> list[list[int]]:
    for i, (n, v) in enumerate(zip(lengths, vision_costs)):
        if n <= 0 or v < 0 or n > max_tokens or v > max_vision:
            raise ValueError(f"sample {i}")
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
    members: list[list[int]] = []
    free_tok = np.zeros(0, dtype=np.int64)
    free_vis = np.zeros(0, dtype=np.int64)
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        chunk = order[start:end]
        chunk = chunk[np.argsort(-key[chunk], kind="stable")]
        n_open = len(members)
        free_tok = np.concatenate([free_tok, np.zeros(len(chunk), dtype=np.int64)])
        free_vis = np.concatenate([free_vis, np.zeros(len(chunk), dtype=np.int64)])
        for i in chunk.tolist():
            fits = np.flatnonzero((free_tok[:n_open] >= tok[i]) & (free_vis[:n_open] >= vis[i]))
            p = int(fits[0]) if len(fits) else n_open
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


def _ref_ratio(loads: np.ndarray) -> float:
    hi, lo = float(loads.max()), float(loads.min())
    if hi == 0:
        return 1.0
    return hi / lo if lo > 0 else float("inf")


def _ref_pack_loads(packs, values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    return np.array([arr[list(p)].sum() for p in packs], dtype=np.float64)


def ref_shard_packs(packs, lengths, vision_costs, world_size, packs_per_rank_per_step, window_steps=16):
    """(steps, token_ratio, vision_ratio, dropped) as lists."""
    if not packs:
        return [], [], [], []
    pack_tok, pack_vis = _ref_pack_loads(packs, lengths), _ref_pack_loads(packs, vision_costs)
    ppr = packs_per_rank_per_step
    per_step = world_size * ppr
    n_steps = len(packs) // per_step
    size = pack_tok / max(pack_tok.mean(), 1e-12) + pack_vis / max(pack_vis.mean(), 1e-12)
    n_drop = len(packs) - n_steps * per_step
    dropped = sorted(np.argsort(size, kind="stable")[:n_drop].tolist())
    dropped_set = set(dropped)
    scheduled = np.array([j for j in range(len(packs)) if j not in dropped_set], dtype=np.int64)
    steps: list[list[list[int]]] = []
    for w0 in range(0, n_steps, window_steps):
        n_win = min(window_steps, n_steps - w0)
        ids = scheduled[w0 * per_step : (w0 + n_win) * per_step]
        t = pack_tok[ids] / max(pack_tok[ids].mean(), 1e-12)
        v = pack_vis[ids] / max(pack_vis[ids].mean(), 1e-12)
        n_bins = n_win * world_size
        load_t, load_v = np.zeros(n_bins), np.zeros(n_bins)
        count = np.zeros(n_bins, dtype=np.int64)
        bins: list[list[int]] = [[] for _ in range(n_bins)]
        for j in np.argsort(-(t + v), kind="stable"):
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
    token_ratio = [_ref_ratio(np.array([pack_tok[r].sum() for r in ranks])) for ranks in steps]
    vision_ratio = [_ref_ratio(np.array([pack_vis[r].sum() for r in ranks])) for ranks in steps]
    return steps, token_ratio, vision_ratio, dropped


def ref_micro_batch_budget(lengths, costs, samples_per_pack, max_vision, seed, floor, groups=None, group_size=0):
    target = max(1, round(len(lengths) / samples_per_pack))
    cap = group_size * floor if groups is not None and group_size > 1 else None
    budget = max(floor, round(samples_per_pack * float(np.mean(lengths))))
    for _ in range(2):
        budget = min(budget, cap) if cap else budget
        made = len(ref_plan_packs(lengths, costs, budget, max_vision, seed, 0, groups=groups, group_size=group_size))
        budget = max(floor, round(budget * made / target))
    return min(budget, cap) if cap else budget


class RefPackedStepPlan:
    def __init__(self, lengths, vision_costs, label_counts, max_tokens, max_vision, batch_size, grad_accum, seed,
                 world_size=1, rank=0, groups=None, group_size=0, one_row=False):
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
        margin = np.ceil(len(packs0) * sampler.EPOCH_STEP_MARGIN)
        self.steps_per_epoch = max(1, int(len(packs0) - margin) // per_step)
        self._cache: dict = {}

    def _packs(self, epoch):
        return ref_plan_packs(self.lengths, self.costs, self.max_tokens, self.max_vision, self.seed, epoch,
                              groups=self.groups, group_size=self.group_size)

    def _epoch(self, epoch):
        if epoch not in self._cache:
            packs = self._packs(epoch)
            self._cache[epoch] = (packs, ref_shard_packs(packs, self.lengths, self.costs, self.world,
                                                         self.accum * self.rows, 1 if self.grouped else 16))
        return self._cache[epoch]

    def step(self, k):
        epoch, pos = divmod(k, self.steps_per_epoch)
        packs, (steps, token_ratio, vision_ratio, _) = self._epoch(epoch)
        pos %= len(steps)
        ranks = steps[pos]
        mine = ranks[self.rank]
        micro = [[packs[j] for j in mine[m * self.rows:(m + 1) * self.rows]] for m in range(self.accum)]
        if self.one_row:
            micro = [[[i for pack in rows for i in pack]] for rows in micro]
        labels = int(sum(self.labels[packs[j]].sum() for r in ranks for j in r))
        return sampler.StepSpec(micro, True, labels, token_ratio[pos], vision_ratio[pos])


def ref_make_plan(dcfg, tcfg, samples, patches_per_frame, seed, world_size=1, rank=0, one_row=False):
    group_size = dcfg.episode_group
    groups = frame_groups([s.frames for s in samples]) if group_size > 1 else None
    labels = [sum(1 for x in s.labels[1:] if x != IGNORE_INDEX) for s in samples]
    if not dcfg.packing:
        return sampler.SampleStepPlan(labels, tcfg.batch_size, tcfg.grad_accum, seed, world_size, rank, groups,
                                      group_size)
    lengths = [len(s.input_ids) for s in samples]
    costs = [len(s.frames) * patches_per_frame for s in samples]
    budget = dcfg.max_pack_tokens
    if budget <= 0 and one_row:
        per_micro = tcfg.batch_size / (world_size * tcfg.grad_accum)
        budget = ref_micro_batch_budget(lengths, costs, per_micro, dcfg.max_pack_vision or NO_VISION_BUDGET, seed,
                                        max(lengths), groups, group_size)
    return RefPackedStepPlan(lengths, costs, labels, budget if budget > 0 else dcfg.max_length, dcfg.max_pack_vision,
                             tcfg.batch_size, tcfg.grad_accum, seed, world_size, rank, groups, group_size, one_row)


# -- inputs ---------------------------------------------------------------------------------------------------
def random_costs(n: int, seed: int, text_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Skewed lengths and 0-8 frames (some text-only samples, whose vision cost is 0)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.3, 0.7, n), 8, 1500).astype(np.int64)
    frames = np.zeros(n, dtype=np.int64) if text_only else rng.integers(0, 9, n)
    return lengths, frames


def episode_samples(n_episodes: int, seed: int) -> list[SimpleNamespace]:
    """Decision samples of episodes (history frames shared inside an episode), varied labels."""
    rng = np.random.default_rng(seed)
    out, offset = [], 0
    for _ in range(n_episodes):
        steps = int(rng.integers(3, 30))
        for t in range(steps):
            frames = tuple(offset + h for h in history_indices(t, 3)) + (offset + t,)
            n = int(rng.integers(30, 160)) + 16 * len(frames)
            labels = [IGNORE_INDEX] * n
            for j in rng.choice(n, int(rng.integers(1, 6)), replace=False).tolist():  # position 0 sometimes
                labels[j] = 7
            out.append(SimpleNamespace(input_ids=[1] * n, labels=labels, frames=frames))
        offset += steps
    return out


class Table:
    """A sample table as make_plan sees the memory-mapped index: arrays, and frame_lists()."""

    def __init__(self, samples: Sequence[SimpleNamespace]):
        self.lengths = np.array([len(s.input_ids) for s in samples])
        self.label_counts = np.array([sum(x != IGNORE_INDEX for x in s.labels[1:]) for s in samples])
        self.num_frames = np.array([len(s.frames) for s in samples])
        self._frames = [s.frames for s in samples]

    def frame_lists(self) -> list[tuple[int, ...]]:
        return list(self._frames)


# -- identical results ----------------------------------------------------------------------------------------
PACK_CASES = [  # (n, seed, max_tokens, max_vision, group_size, window, text_only)
    (1500, 0, 2048, 24, 0, DEFAULT_WINDOW, False),
    (1500, 1, 1500, NO_VISION_BUDGET, 0, DEFAULT_WINDOW, False),
    (900, 2, 4096, 12, 0, 64, False),
    (1200, 3, 1600, 1, 0, DEFAULT_WINDOW, True),
    (1000, 4, 2500, 16, 4, DEFAULT_WINDOW, False),
    (700, 5, 1500, NO_VISION_BUDGET, 8, DEFAULT_WINDOW, False),
    (37, 6, 1500, 10, 0, 16, False),
]


@pytest.mark.parametrize("n,seed,max_tokens,max_vision,group_size,window,text_only", PACK_CASES)
def test_plan_packs_and_shard_packs_equal_the_list_implementation(n, seed, max_tokens, max_vision, group_size,
                                                                    window, text_only):
    lengths, frames = random_costs(n, seed, text_only)
    groups = np.random.default_rng(seed).integers(0, max(1, n // 12), n) if group_size else None
    for epoch in (0, 3):
        ref = ref_plan_packs(lengths.tolist(), frames.tolist(), max_tokens, max_vision, seed, epoch, window,
                             groups, group_size)
        packs = plan_packs(lengths, frames, max_tokens, max_vision, seed, epoch, window, groups, group_size)
        assert isinstance(packs, Packs) and list(packs) == ref and len(packs) == len(ref)
        assert plan_packs(lengths.tolist(), frames.tolist(), max_tokens, max_vision, seed, epoch, window, groups,
                          group_size) == packs  # lists in, the same packs out
        for world in (1, 2, 4):
            for ppr in (1, 2, 3):
                for window_steps in (1, 16):
                    steps, token_ratio, vision_ratio, dropped = ref_shard_packs(ref, lengths, frames, world, ppr,
                                                                                window_steps)
                    shard = shard_packs(packs, lengths, frames, world, ppr, window_steps)
                    assert shard.steps.dtype == np.int64 and shard.steps.shape[1:] == (world, ppr)
                    assert shard.steps.tolist() == steps, (world, ppr, window_steps)
                    assert shard.token_ratio.tolist() == token_ratio and shard.vision_ratio.tolist() == vision_ratio
                    assert shard.dropped.tolist() == dropped
                    assert shard_packs(ref, lengths.tolist(), frames.tolist(), world, ppr, window_steps) == shard


PLAN_CASES = [  # (world, grad_accum, batch, one_row, max_pack_tokens, max_pack_vision, episode_group, packing)
    (1, 1, 8, True, 0, 0, 0, True),
    (2, 1, 8, True, 0, 0, 0, True),
    (4, 2, 32, True, 0, 320, 0, True),
    (1, 2, 16, False, 0, 0, 0, True),
    (2, 1, 16, False, 1200, 256, 0, True),
    (4, 1, 16, True, 900, 0, 0, True),
    (2, 1, 8, True, 0, 0, 4, True),
    (1, 1, 8, False, 0, 0, 4, True),
    (2, 2, 16, True, 0, 0, 0, False),
    (2, 1, 8, True, 0, 0, 4, False),
]


@pytest.mark.parametrize("world,accum,batch,one_row,max_pack_tokens,max_pack_vision,group,packing", PLAN_CASES)
def test_make_plan_steps_equal_the_list_implementation(world, accum, batch, one_row, max_pack_tokens,
                                                       max_pack_vision, group, packing):
    samples = episode_samples(60, seed=world + 10 * accum + batch)
    dcfg = SimpleNamespace(packing=packing, episode_group=group, max_pack_tokens=max_pack_tokens, max_length=512,
                           max_pack_vision=max_pack_vision)
    tcfg = SimpleNamespace(batch_size=batch, grad_accum=accum)
    for rank in range(world):
        ref = ref_make_plan(dcfg, tcfg, samples, 64, 3, world, rank, one_row)
        for given in (samples, Table(samples)):
            plan = make_plan(dcfg, tcfg, given, 64, 3, world, rank, one_row=one_row)
            assert plan.steps_per_epoch == ref.steps_per_epoch
            if packing:
                assert (plan.max_tokens, plan.rows) == (ref.max_tokens, ref.rows)
            ks = range(2 * plan.steps_per_epoch + 2)  # into the third epoch
            assert [plan.step(k) for k in ks] == [ref.step(k) for k in ks]


def test_micro_batch_budget_equals_the_list_implementation():
    for seed in range(3):
        lengths, frames = random_costs(2000, seed)
        groups = frame_groups([(i // 7,) for i in range(2000)]) if seed == 2 else None
        for per_pack in (2.0, 5.5, 16.0):
            args = (per_pack, NO_VISION_BUDGET if seed else 640, seed, int(lengths.max()), groups, 4 if seed == 2 else 0)
            assert micro_batch_budget(lengths, frames * 64, *args) == ref_micro_batch_budget(
                lengths.tolist(), (frames * 64).tolist(), *args)


# -- arrays in, arrays out ------------------------------------------------------------------------------------
def test_sample_arrays_of_a_table_and_of_a_list_agree():
    samples = episode_samples(10, seed=0)
    lengths, labels, frames = sample_arrays(samples)
    assert all(a.dtype == np.int64 for a in (lengths, labels, frames))
    assert lengths.tolist() == [len(s.input_ids) for s in samples]
    # A label at position 0 is never a target: not counted.
    assert labels.tolist() == [sum(x != IGNORE_INDEX for x in s.labels[1:]) for s in samples]
    assert frames.tolist() == [len(s.frames) for s in samples]
    assert all(np.array_equal(a, b) for a, b in zip(sample_arrays(Table(samples)), (lengths, labels, frames)))
    assert [len(a) for a in sample_arrays([])] == [0, 0, 0]


def test_packs_behave_like_a_list_of_lists():
    lists = [[4, 1], [0], [2, 5, 3]]
    packs = Packs.from_lists(lists)
    assert packs.order.dtype == packs.bounds.dtype == np.int64 and packs.bounds.tolist() == [0, 2, 3, 6]
    assert len(packs) == 3 and list(packs) == lists and packs == lists and packs == Packs.from_lists(lists)
    assert packs[0] == [4, 1] and packs[np.int64(2)] == [2, 5, 3] and packs[-1] == [2, 5, 3]
    with pytest.raises(IndexError):
        packs[3]
    assert packs.sizes().tolist() == [2, 1, 3]
    assert packs.sums([10, 20, 30, 40, 50, 60]).tolist() == [70, 10, 130]
    assert list(packs.take([2, 0])) == [[2, 5, 3], [4, 1]]
    assert Packs.from_lists([[1], []]).sums([5, 6]).tolist() == [6, 0]


def test_validation_names_the_first_offending_sample():
    lengths, frames = np.full(10, 10), np.ones(10, dtype=np.int64)
    lengths[[3, 7]] = 600
    frames[2] = 9
    with pytest.raises(ValueError, match="sample 2: vision cost 9 > max_vision=4"):
        plan_packs(lengths, frames, max_tokens=512, max_vision=4, seed=0, epoch=0)
    frames[2] = 1
    with pytest.raises(ValueError, match="sample 3: 600 tokens > max_tokens=512"):
        plan_packs(lengths, frames, max_tokens=512, max_vision=4, seed=0, epoch=0)
    lengths[1] = 0
    with pytest.raises(ValueError, match="sample 1: length 0 must be > 0 and vision cost 1 >= 0"):
        plan_packs(lengths, frames, max_tokens=512, max_vision=4, seed=0, epoch=0)


# -- the plan cache -------------------------------------------------------------------------------------------
DCFG = SimpleNamespace(packing=True, episode_group=0, max_pack_tokens=0, max_length=512, max_pack_vision=0)
TCFG = SimpleNamespace(batch_size=8, grad_accum=1)


def _no_planning(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("planned again instead of reading the plan cache")

    for name in ("plan_packs", "shard_packs", "micro_batch_budget"):
        monkeypatch.setattr(sampler, name, refuse)


def test_plan_cache_reads_back_the_same_plan(tmp_path, monkeypatch):
    table = Table(episode_samples(60, seed=1))
    fresh = [make_plan(DCFG, TCFG, table, 64, 0, 2, r, one_row=True) for r in range(2)]
    spe = fresh[0].steps_per_epoch
    ref = [[plan.step(k) for k in range(2 * spe + 1)] for plan in fresh]
    make_plan(DCFG, TCFG, table, 64, 0, 2, 0, one_row=True, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("plan-") and files[0].suffix == ".npz"  # no temporary left
    with monkeypatch.context() as m:
        _no_planning(m)
        # Every rank reads the one file (the rank is not in the key): epoch 0 needs no planning at all.
        cached = [make_plan(DCFG, TCFG, table, 64, 0, 2, r, one_row=True, cache_dir=tmp_path) for r in range(2)]
        for plan, old in zip(cached, fresh):
            assert (plan.max_tokens, plan.rows, plan.steps_per_epoch) == (old.max_tokens, old.rows, spe)
        assert [[plan.step(k) for k in range(spe)] for plan in cached] == [steps[:spe] for steps in ref]
    # Later epochs are planned as usual.
    assert [[plan.step(k) for k in range(2 * spe + 1)] for plan in cached] == ref


def test_plan_cache_key_changes_with_every_input(tmp_path):
    lengths, frames = random_costs(300, 0)
    labels = np.ones(300, dtype=np.int64)
    base = dict(lengths=lengths, costs=frames * 64, label_counts=labels, groups=None, seed=0, max_tokens=0,
                max_vision=NO_VISION_BUDGET, batch_size=8, grad_accum=1, world_size=1, one_row=True, group_size=0)
    key = plan_key(**base)
    assert len(key) == 32 and key == plan_key(**dict(base, lengths=lengths.astype(np.int32)))
    changed = dict(lengths=lengths + 1, costs=frames * 32, label_counts=labels * 2, groups=np.arange(300), seed=1,
                   max_tokens=1024, max_vision=640, batch_size=16, grad_accum=2, world_size=2, one_row=False,
                   group_size=4)
    keys = {plan_key(**dict(base, **{name: value})) for name, value in changed.items()}
    assert len(keys) == len(changed) and key not in keys
    table = Table(episode_samples(60, seed=1))
    make_plan(DCFG, TCFG, table, 64, 0, 1, 0, one_row=True, cache_dir=tmp_path)
    make_plan(DCFG, SimpleNamespace(batch_size=16, grad_accum=1), table, 64, 0, 1, 0, one_row=True, cache_dir=tmp_path)
    make_plan(DCFG, TCFG, table, 64, 1, 1, 0, one_row=True, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("plan-*.npz"))) == 3


def test_a_damaged_plan_cache_is_planned_again_and_rewritten(tmp_path, monkeypatch, caplog):
    table = Table(episode_samples(60, seed=2))
    ref = make_plan(DCFG, TCFG, table, 64, 0, 1, 0, one_row=True, cache_dir=tmp_path)
    (path,) = tmp_path.glob("plan-*.npz")
    path.write_bytes(b"not a plan")
    with caplog.at_level(logging.WARNING, logger="vlmtrain.data.sampler"):
        again = make_plan(DCFG, TCFG, table, 64, 0, 1, 0, one_row=True, cache_dir=tmp_path)
    assert "unreadable" in caplog.text
    spe = ref.steps_per_epoch
    assert [again.step(k) for k in range(spe)] == [ref.step(k) for k in range(spe)]
    with monkeypatch.context() as m:  # rewritten: read back without planning
        _no_planning(m)
        read = make_plan(DCFG, TCFG, table, 64, 0, 1, 0, one_row=True, cache_dir=tmp_path)
        assert [read.step(k) for k in range(spe)] == [ref.step(k) for k in range(spe)]
