"""Step plans (data/sampler.py): pure in (seed, epoch, world, rank), seekable, disjoint across ranks,
balanced when packed; and the loss normaliser they carry makes a step's gradient independent of how
its samples are split into micro-batches and ranks (train/step.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlmtrain.data.loader import EpochPlan, StepBuilder
from vlmtrain.data.packing import plan_packs
from vlmtrain.models.protocol import IGNORE_INDEX
from vlmtrain.data.sampler import PackedStepPlan, SampleStepPlan, StepSpec, make_plan
from vlmtrain.train.step import train_step

N, BATCH = 3000, 256
MAX_TOKENS, PATCHES, MAX_FRAMES = 4096, 64, 48


def vln_like(n: int = N, seed: int = 5) -> tuple[list[int], list[int], list[int]]:
    """(lengths, vision costs in patches, label counts): 1-9 frames of 64 tokens plus skewed text."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(1, 10, n)
    text = np.clip(rng.lognormal(3.7, 0.6, n), 5, 400).astype(int)
    return (20 + text + 64 * frames).tolist(), (PATCHES * frames).tolist(), rng.integers(1, 6, n).tolist()


LENGTHS, COSTS, LABELS = vln_like()


def plan_of(kind: str, world: int = 1, rank: int = 0, accum: int = 2, seed: int = 0, batch: int = BATCH):
    if kind == "padded":
        return SampleStepPlan(LABELS, batch, accum, seed, world, rank)
    return PackedStepPlan(LENGTHS, COSTS, LABELS, MAX_TOKENS, MAX_FRAMES * PATCHES, batch, accum, seed, world, rank)


def flat(spec: StepSpec) -> list[int]:
    return [i for micro in spec.micro for row in micro for i in row]


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_step_is_a_pure_function_of_k_and_seekable(kind):
    walked = plan_of(kind, world=2, rank=1)
    spe = walked.steps_per_epoch
    ks = list(range(2 * spe + 3))  # crosses two epoch boundaries
    in_order = [walked.step(k) for k in ks]
    jumper = plan_of(kind, world=2, rank=1)
    for k in reversed(ks):  # jump straight to each step, latest epoch first
        assert jumper.step(k) == in_order[k], k
    for k in (0, spe - 1, spe, 2 * spe + 2):  # a fresh plan object per step
        assert plan_of(kind, world=2, rank=1).step(k) == in_order[k], k
    assert all(len(s.micro) == 2 for s in in_order)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_ranks_disjoint_and_each_sample_at_most_once_per_epoch(kind, world):
    ranks = [plan_of(kind, world, r) for r in range(world)]
    spe = ranks[0].steps_per_epoch
    assert all(p.steps_per_epoch == spe for p in ranks)
    for epoch in range(3):
        seen: list[int] = []
        for k in range(epoch * spe, (epoch + 1) * spe):
            specs = [p.step(k) for p in ranks]
            mine = [flat(s) for s in specs]
            assert all(mine), "a rank got an empty step"
            step_ids = [i for m in mine for i in m]
            assert len(set(step_ids)) == len(step_ids), f"ranks overlap at step {k}"
            # Every rank runs the same number of micro-batches and rows (collectives stay in lockstep).
            assert len({(len(s.micro), tuple(len(m) for m in s.micro)) for s in specs}) == 1
            # The normaliser is the whole step's label tokens, the same on every rank.
            assert {s.label_tokens for s in specs} == {sum(LABELS[i] for i in step_ids)}
            seen.extend(step_ids)
        assert len(set(seen)) == len(seen), f"a sample repeats within epoch {epoch}"
        if kind == "padded":  # exactly the epoch order's prefix of whole batches
            assert seen == EpochPlan(N, BATCH, 0).order(epoch)[: spe * BATCH].tolist()
        else:  # left out: the packs that fill no step, and one step of margin (sampler.EPOCH_STEP_MARGIN)
            assert N - len(seen) < 3 * BATCH


def rank_loads(specs: list[StepSpec]) -> tuple[np.ndarray, np.ndarray]:
    tok = np.array([sum(LENGTHS[i] for i in flat(s)) for s in specs], dtype=float)
    vis = np.array([sum(COSTS[i] for i in flat(s)) for s in specs], dtype=float)
    return tok, vis


def test_packed_plan_respects_budgets_and_beats_round_robin():
    world, accum = 4, 1  # batch 64: 2 packs per rank per step, where dealing order matters most
    ranks = [plan_of("packed", world, r, accum, batch=64) for r in range(world)]
    spe, rows = ranks[0].steps_per_epoch, ranks[0].rows
    token_ratio, vision_ratio, scheduled = [], [], []
    for k in range(spe):
        specs = [p.step(k) for p in ranks]
        for s in specs:
            for pack in (row for micro in s.micro for row in micro):
                assert sum(LENGTHS[i] for i in pack) <= MAX_TOKENS
                assert sum(COSTS[i] for i in pack) <= MAX_FRAMES * PATCHES
                scheduled.append(tuple(pack))
        tok, vis = rank_loads(specs)
        # The reported ratios are the real max/min loads over this step's ranks.
        assert specs[0].token_ratio == pytest.approx(tok.max() / tok.min())
        assert specs[0].vision_ratio == pytest.approx(vis.max() / vis.min())
        token_ratio.append(tok.max() / tok.min())
        vision_ratio.append(vis.max() / vis.min())
    # Naive baseline on the same packs: the epoch's pack order, dealt to ranks in turn.
    chosen = set(scheduled)
    packs = [p for p in plan_packs(LENGTHS, COSTS, MAX_TOKENS, MAX_FRAMES * PATCHES, 0, 0) if tuple(p) in chosen]
    assert len(packs) == len(scheduled) == spe * world * rows
    naive_tok, naive_vis = [], []
    for k in range(spe):
        step = packs[k * world * rows:(k + 1) * world * rows]
        specs = [StepSpec([step[r::world]], True, 0) for r in range(world)]
        tok, vis = rank_loads(specs)
        naive_tok.append(tok.max() / tok.min())
        naive_vis.append(vis.max() / vis.min())
    balanced = (float(np.mean(token_ratio)), float(np.mean(vision_ratio)))
    naive = (float(np.mean(naive_tok)), float(np.mean(naive_vis)))
    print(f"packed world {world}, {rows} packs/rank/step, {spe} steps: mean max/min tokens "
          f"{balanced[0]:.3f} vs round-robin {naive[0]:.3f}; vision {balanced[1]:.3f} vs {naive[1]:.3f}")
    # Measured: tokens 1.030 vs 1.100, vision 1.032 vs 1.068.
    assert balanced[0] < 1.06 and balanced[1] < 1.06
    assert balanced[0] < naive[0] - 0.03 and balanced[1] < naive[1] - 0.01


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_seed_and_epoch_change_the_order(kind):
    a, b = plan_of(kind, seed=0), plan_of(kind, seed=1)
    spe = a.steps_per_epoch
    assert flat(a.step(0)) != flat(b.step(0))
    assert flat(a.step(0)) != flat(a.step(spe))  # same position, next epoch
    epoch0 = [i for k in range(spe) for i in flat(a.step(k))]
    epoch1 = [i for k in range(spe, 2 * spe) for i in flat(a.step(k))]
    assert epoch0 != epoch1 and sorted(epoch0) != epoch0


# -- loss normalisation over micro-batches and ranks (real GridNav samples, tiny composed model) -----
@pytest.fixture(scope="module")
def gridnav_small(tmp_path_factory):
    """(config, data, model) on 6 GridNav episodes (~220 samples)."""
    from vlmtrain.envs.gridnav.generate import write_dataset
    from vlmtrain.presets import gridnav_tiny
    from vlmtrain.train.build import build_model_and_data

    cfg = gridnav_tiny()
    cfg.data.root = str(write_dataset(tmp_path_factory.mktemp("gridnav") / "train", episodes=6, seed=0, workers=1))
    cfg.data.gridnav_episodes = 0
    cfg.data.max_pack_tokens, cfg.data.max_pack_vision = 64, 96  # ~2 samples per pack, both budgets bind
    cfg.output_dir = str(tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    model, data = build_model_and_data(cfg, Path(cfg.output_dir))
    # GridNav samples all carry the same label count, under which a mean of micro-batch means would
    # pass too: label 0-4 more prompt tokens per sample so only a token-weighted normaliser is right.
    data.samples = [more_labels(s, i % 5) for i, s in enumerate(data.samples)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention on a shared 2-core box
    yield cfg, data, model
    torch.set_num_threads(threads)


def more_labels(sample, extra: int):
    """A copy of ``sample`` whose ``extra`` prompt tokens before the answer are labelled too."""
    labels = list(sample.labels)
    first = next(j for j, x in enumerate(labels) if x != IGNORE_INDEX)
    labels[max(1, first - extra):first] = sample.input_ids[max(1, first - extra):first]
    return dataclasses.replace(sample, labels=labels)


class GradCapture:
    """An optimizer that keeps the gradients train_step hands it and changes nothing (lr 0)."""

    def __init__(self, model):
        self.param_groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 0.0}]
        self.grads: list[torch.Tensor] = []

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.param_groups[0]["params"]]

    def zero_grad(self, set_to_none=True):
        for p in self.param_groups[0]["params"]:
            p.grad = None


def step_grads(model, micro, world_size: int = 1) -> torch.Tensor:
    opt = GradCapture(model)
    train_step(model, micro, opt, SimpleNamespace(step=lambda: None), 0.0, "fp32", torch.device("cpu"),
               world_size=world_size)
    return torch.cat([g.flatten() for g in opt.grads])


class Fixed:
    """A plan that always returns one spec (splits of one step's packs, built by hand)."""

    def __init__(self, spec: StepSpec):
        self.spec = spec

    def step(self, k: int) -> StepSpec:
        return self.spec


RTOL, ATOL = 1e-5, 1e-6  # fp32, gradients up to ~0.7; observed max difference ~1e-7 (summation order, padding)


@pytest.mark.parametrize("packing", [False, True])
def test_step_gradient_independent_of_micro_batches_and_ranks(gridnav_small, packing):
    cfg, data, model = gridnav_small
    pad, image = data.pad_id, data.image_id
    model.train()

    def build(plan, k=0):
        return StepBuilder(data.samples, data.frames, pad, image, plan)(k)

    def plan(accum: int, world: int = 1, rank: int = 0):
        dcfg = dataclasses.replace(cfg.data, packing=packing)
        tcfg = dataclasses.replace(cfg.train, batch_size=16, grad_accum=accum)
        return make_plan(dcfg, tcfg, data.samples, model.vision_patches_per_frame(), 0, world, rank)

    big_plan = plan(1)
    whole = build(big_plan)
    assert len(whole) == 1 and whole[0].num_label_tokens == whole[0].step_label_tokens > 0
    ref = step_grads(model, whole)
    assert ref.abs().max() > 0
    spec = big_plan.step(0)
    if packing:  # the same packs split by hand (a packed plan's steps depend on world x accum)
        packs = spec.micro[0]
        assert len(packs) >= 4, len(packs)  # split 2 and 4 ways below (unevenly is fine: label-token weights)

        def split(parts: int) -> list[list[list[int]]]:
            return [packs[j::parts] for j in range(parts)]

        accum = {a: build(Fixed(StepSpec(split(a), True, spec.label_tokens))) for a in (2, 4)}
        shards = [build(Fixed(StepSpec(split(4)[2 * r:2 * r + 2], True, spec.label_tokens))) for r in (0, 1)]
    else:  # padded plans cut the same epoch order whatever world x accum is
        accum = {a: build(plan(a)) for a in (2, 4)}
        shards = [build(plan(2, world=2, rank=r)) for r in (0, 1)]
    for a, micro in accum.items():
        assert len(micro) == a
        assert sorted(i for b in micro for i in b.sample_ids) == sorted(whole[0].sample_ids)
        assert sum(b.num_label_tokens for b in micro) == micro[0].step_label_tokens == spec.label_tokens
        torch.testing.assert_close(step_grads(model, micro), ref, rtol=RTOL, atol=ATOL, msg=f"grad_accum={a}")
    # The test can fail: the mean of the micro-batches' own mean losses is not the step's token mean.
    means = [step_grads(model, [dataclasses.replace(b, step_label_tokens=0)]) for b in accum[4]]
    assert not torch.allclose(sum(means) / 4, ref, rtol=1e-3, atol=ATOL)
    assert sorted(i for s in shards for b in s for i in b.sample_ids) == sorted(whole[0].sample_ids)
    assert sum(b.num_label_tokens for s in shards for b in s) == shards[0][0].step_label_tokens == spec.label_tokens
    # Each rank weights its micro-batches by their share of the *step's* label tokens times world size;
    # DDP then averages the ranks' gradients, which must give the big batch's gradient.
    per_rank = [step_grads(model, s, world_size=2) for s in shards]
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, ref, rtol=RTOL, atol=ATOL)
    # The test can fail: forgetting world_size halves the averaged gradient.
    wrong = [step_grads(model, s, world_size=1) for s in shards]
    assert not torch.allclose((wrong[0] + wrong[1]) / 2, ref, rtol=1e-3, atol=ATOL)
