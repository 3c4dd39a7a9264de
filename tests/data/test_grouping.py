"""Episode grouping (data/grouping.py and its use in the step plans): components of shared frames,
chunked orders that are still permutations, and steps that encode fewer frames."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vlmtrain.data.grouping import frame_groups, grouped_chunks, grouped_permutation
from vlmtrain.data.packing import plan_packs
from vlmtrain.data.samples import history_indices
from vlmtrain.data.sampler import make_plan


def vln_frames(lengths: list[int]) -> list[tuple[int, ...]]:
    """Frame ids of every decision of episodes of ``lengths`` frames (8 history frames + current)."""
    out, offset = [], 0
    for n in lengths:
        out += [tuple(offset + h for h in history_indices(t, 8)) + (offset + t,) for t in range(n)]
        offset += n
    return out


def test_frame_groups_are_components_of_shared_frames():
    # 0-1 share frame 1, 1-4 share frame 2 (so 0, 1, 4 are one group through 1), 2-5 share frame 5;
    # frame-less samples are alone.
    groups = frame_groups([[0, 1], [1, 2], [5], [], [2, 3], [6, 5], []])
    assert groups[0] == groups[1] == groups[4]
    assert groups[2] == groups[5]
    assert len({groups[0], groups[2], groups[3], groups[6]}) == 4
    episodes = frame_groups(vln_frames([5, 7, 3]))
    assert episodes.tolist() == [0] * 5 + [1] * 7 + [2] * 3


def test_grouped_order_is_a_permutation_in_chunks_of_one_group():
    groups = frame_groups(vln_frames([26, 9, 30, 4]))
    rng = np.random.default_rng([0, 0])
    order, bounds = grouped_chunks(groups, 4, rng)
    assert sorted(order.tolist()) == list(range(len(groups)))
    sizes = np.diff(bounds)
    # Every chunk has 4 samples (the last may be shorter), so steps of 4 start on chunk boundaries.
    assert sizes.sum() == len(groups) and set(sizes[:-1].tolist()) == {4} and 1 <= sizes[-1] <= 4
    one_group = [len(set(groups[order[a:b]].tolist())) == 1 for a, b in zip(bounds[:-1], bounds[1:])]
    # Whole chunks of one episode: 26 // 4 + 9 // 4 + 30 // 4 + 4 // 4 = 16; the remainders (2 + 1 + 2)
    # are mixed into the other chunks.
    assert sum(one_group) >= 16 and len(one_group) == 18
    # Seeded: the same generator state gives the same order, another epoch another one.
    again = grouped_permutation(groups, 4, np.random.default_rng([0, 0]))
    assert np.array_equal(order, again)
    assert not np.array_equal(order, grouped_permutation(groups, 4, np.random.default_rng([0, 1])))
    # Size 1: exactly the plain permutation of the same generator.
    assert np.array_equal(grouped_permutation(groups, 1, np.random.default_rng(5)),
                          np.random.default_rng(5).permutation(len(groups)))


def _frames_per_sample(plan, frames, steps) -> float:
    encoded = samples = 0
    for k in range(steps):
        for micro in plan.step(k).micro:
            ids = [i for row in micro for i in row]
            encoded += len({f for i in ids for f in frames[i]})
            samples += len(ids)
    return encoded / samples


@pytest.mark.parametrize("packing", [False, True])
def test_grouped_steps_encode_fewer_frames_and_see_every_sample(packing):
    frames = vln_frames([26] * 30)
    samples = [SimpleNamespace(frames=f, input_ids=[1] * (20 + 17 * len(f)), labels=[-100] * (18 + 17 * len(f)) + [5, 6])
               for f in frames]
    tcfg = SimpleNamespace(batch_size=4, grad_accum=1)

    def plan(group: int):
        dcfg = SimpleNamespace(packing=packing, episode_group=group, max_pack_tokens=0, max_length=512,
                               max_pack_vision=0)
        return make_plan(dcfg, tcfg, samples, 64, seed=0)

    plain, grouped = plan(0), plan(4)
    steps = min(plain.steps_per_epoch, grouped.steps_per_epoch)
    # 26-frame episodes, groups of 4: 7.6 -> ~4.2 frames per sample (data/grouping.py) when steps are
    # whole chunks; packed steps are whole packs, which do not always end on a chunk boundary.
    assert _frames_per_sample(plain, frames, steps) > 7.0
    assert _frames_per_sample(grouped, frames, steps) < (5.0 if packing else 4.6)
    seen = [i for k in range(grouped.steps_per_epoch) for m in grouped.step(k).micro for r in m for i in r]
    assert len(seen) == len(set(seen))  # nobody twice in an epoch
    assert len(seen) >= 0.95 * len(samples)


def test_packed_groups_stay_in_their_chunk():
    groups = frame_groups(vln_frames([26, 26, 26]))
    lengths = [200] * len(groups)
    packs = plan_packs(lengths, [0] * len(groups), 512, 1, seed=0, epoch=0, groups=groups, group_size=4)
    assert sorted(i for p in packs for i in p) == list(range(len(groups)))
    assert all(len(set(groups[p].tolist())) == 1 for p in packs)


def test_no_grouping_with_a_feature_cache():
    frames = vln_frames([26] * 4)
    samples = [SimpleNamespace(frames=f, input_ids=[1] * 40, labels=[-100] * 38 + [5, 6]) for f in frames]
    dcfg = SimpleNamespace(packing=False, episode_group=4)
    tcfg = SimpleNamespace(batch_size=4, grad_accum=1)
    cached = make_plan(dcfg, tcfg, samples, 64, seed=0, cached=True)
    plain = make_plan(SimpleNamespace(packing=False, episode_group=0), tcfg, samples, 64, seed=0)
    assert [cached.step(k).micro for k in range(5)] == [plain.step(k).micro for k in range(5)]
