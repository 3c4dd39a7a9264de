"""Packing plan, rank balance and packed masks (packed forward == per-document forwards on HF LMs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from vlmtrain.models.packed_attention import document_attention_mask
from vlmtrain.data.packing import (
    IGNORE_INDEX,
    pack_labels,
    pack_position_ids,
    padding_efficiency,
    plan_packs,
    shard_packs,
)


def random_data(n: int = 2000, seed: int = 0) -> tuple[list[int], list[int]]:
    """Skewed lengths (many short, some long) and per-sample frame counts."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.5, 0.8, n), 8, 2000).astype(int).tolist()
    frames = rng.integers(1, 9, n).tolist()
    return lengths, frames


def test_every_sample_once_and_budgets_respected():
    lengths, frames = random_data()
    packs = plan_packs(lengths, frames, max_tokens=4096, max_vision=48, seed=3, epoch=0)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(len(lengths)))
    for p in packs:
        assert sum(lengths[i] for i in p) <= 4096
        assert sum(frames[i] for i in p) <= 48
    # First-fit-decreasing fills packs: few more packs than the tighter budget's lower bound.
    lower = max(sum(lengths) / 4096, sum(frames) / 48)
    assert len(packs) <= 1.1 * lower + 4


def test_vision_budget_binds_for_short_image_heavy_samples():
    lengths, frames = [20] * 100, [8] * 100
    packs = plan_packs(lengths, frames, max_tokens=4096, max_vision=16, seed=0, epoch=0)
    assert all(len(p) == 2 for p in packs)  # tokens would allow 100 per pack; frames allow 2


def test_over_budget_sample_is_an_error_naming_it():
    lengths, frames = [10] * 10, [1] * 10
    lengths[7] = 600
    with pytest.raises(ValueError, match="sample 7: 600 tokens > max_tokens=512"):
        plan_packs(lengths, frames, max_tokens=512, max_vision=4, seed=0, epoch=0)
    lengths[7], frames[3] = 10, 9
    with pytest.raises(ValueError, match="sample 3: vision cost 9 > max_vision=4"):
        plan_packs(lengths, frames, max_tokens=512, max_vision=4, seed=0, epoch=0)
    with pytest.raises(ValueError, match="vision costs"):
        plan_packs([1, 2], [1], max_tokens=512, max_vision=4, seed=0, epoch=0)


def test_plan_is_deterministic_per_seed_and_epoch():
    lengths, frames = random_data(500)
    args = dict(max_tokens=2048, max_vision=32)
    a = plan_packs(lengths, frames, seed=1, epoch=2, **args)
    assert a == plan_packs(lengths, frames, seed=1, epoch=2, **args)
    assert a != plan_packs(lengths, frames, seed=1, epoch=3, **args)
    assert a != plan_packs(lengths, frames, seed=2, epoch=2, **args)


def round_robin_ratios(packs, lengths, world, ppr) -> list[float]:
    """Naive baseline: consecutive packs dealt to ranks in turn."""
    out = []
    per_step = world * ppr
    for s in range(len(packs) // per_step):
        loads = np.zeros(world)
        for k in range(per_step):
            loads[k % world] += sum(lengths[i] for i in packs[s * per_step + k])
        out.append(loads.max() / loads.min())
    return out


def vln_like_data(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Decision samples: 1-9 frames of 64 visual tokens each plus a skewed text part."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(1, 10, n)
    text = np.clip(rng.lognormal(3.7, 0.6, n), 5, 400).astype(int)
    return (20 + text + 64 * frames).tolist(), frames.tolist()


@pytest.mark.parametrize("ppr", [1, 2, 4])
def test_shard_balances_tokens_better_than_round_robin(ppr):
    lengths, frames = vln_like_data(3000, seed=5)
    packs = plan_packs(lengths, frames, max_tokens=4096, max_vision=48, seed=0, epoch=0)
    world = 4
    plan = shard_packs(packs, lengths, frames, world_size=world, packs_per_rank_per_step=ppr)
    assert plan == shard_packs(packs, lengths, frames, world_size=world, packs_per_rank_per_step=ppr)
    # Every rank gets exactly ppr packs per step; every pack is scheduled once or dropped.
    used = [j for step in plan.steps for ranks in step for j in ranks]
    assert all(len(ranks) == ppr for step in plan.steps for ranks in step)
    assert sorted(used + plan.dropped.tolist()) == list(range(len(packs)))
    assert len(plan.dropped) < world * ppr
    # Same packs for the baseline: the dropped remainder is the smallest packs.
    kept = [p for j, p in enumerate(packs) if j not in set(plan.dropped)]
    if plan.dropped:
        assert max(sum(lengths[i] for i in packs[j]) for j in plan.dropped) <= np.median(
            [sum(lengths[i] for i in p) for p in kept])
    naive = float(np.mean(round_robin_ratios(kept, lengths, world, ppr)))
    balanced = float(np.mean(plan.token_ratio))
    assert balanced < 1.1
    assert balanced < naive
    assert float(np.mean(plan.vision_ratio)) < 1.1


def test_shard_beats_round_robin_on_independent_costs():
    """Tokens and frames drawn independently (the hard case for two budgets): still better than naive."""
    lengths, frames = random_data(3000, seed=1)
    packs = plan_packs(lengths, frames, max_tokens=4096, max_vision=64, seed=0, epoch=0)
    plan = shard_packs(packs, lengths, frames, world_size=4, packs_per_rank_per_step=4)
    kept = [p for j, p in enumerate(packs) if j not in set(plan.dropped)]
    assert float(np.mean(plan.token_ratio)) < min(1.15, float(np.mean(round_robin_ratios(kept, lengths, 4, 4))))
    assert float(np.mean(plan.vision_ratio)) < 1.15


def test_shard_balances_vision_cost_too():
    # Equal tokens everywhere, very unequal frames: only the vision term can separate the packs.
    lengths = [100] * 16
    frames = [1, 1, 1, 1, 1, 1, 1, 1, 9, 9, 9, 9, 9, 9, 9, 9]
    packs = [[i] for i in range(16)]
    plan = shard_packs(packs, lengths, frames, world_size=4, packs_per_rank_per_step=4)
    assert plan.token_ratio.tolist() == [1.0] and plan.vision_ratio.tolist() == [1.0]


def test_text_only_data_and_empty_inputs():
    lengths = [30, 50, 70, 90, 20, 40, 60, 80]
    packs = plan_packs(lengths, [0] * 8, max_tokens=100, max_vision=1, seed=0, epoch=0)
    plan = shard_packs(packs, lengths, [0] * 8, world_size=2, packs_per_rank_per_step=1)
    assert all(r == 1.0 for r in plan.vision_ratio)
    assert list(plan_packs([], [], max_tokens=100, max_vision=1, seed=0, epoch=0)) == []
    empty = shard_packs([], [], [], world_size=2, packs_per_rank_per_step=1)
    assert empty.steps.shape == (0, 2, 1) and len(empty.dropped) == 0


def test_position_ids_reset_per_document():
    pos = pack_position_ids([3, 1, 2])
    assert pos.dtype == torch.long and pos.tolist() == [[0, 1, 2, 0, 0, 1]]


def test_mask_is_block_diagonal_and_causal():
    docs = [3, 1, 4]
    mask = document_attention_mask(docs, torch.float32)
    assert mask.shape == (1, 1, 8, 8)
    doc_of = [d for d, n in enumerate(docs) for _ in range(n)]
    for i in range(8):
        for j in range(8):
            allowed = doc_of[i] == doc_of[j] and j <= i
            assert mask[0, 0, i, j].item() == (0.0 if allowed else float("-inf"))
    assert document_attention_mask(docs, torch.bfloat16).dtype == torch.bfloat16


def test_pack_labels_never_cross_documents():
    labels = pack_labels([[5, 6, 7], [8, 9]])
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]


def test_padding_efficiency():
    assert padding_efficiency(750, 1000) == 0.75
    with pytest.raises(ValueError):
        padding_efficiency(5, 0)
    with pytest.raises(ValueError):
        padding_efficiency(11, 10)


def tiny_lm(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    cfg = AutoConfig.for_model(arch, vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               tie_word_embeddings=False, **extra)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


def next_token_losses(logits_LV: torch.Tensor, ids_L: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting token t+1 from position t, within one document."""
    return F.cross_entropy(logits_LV[:-1], ids_L[1:], reduction="none")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_packed_forward_equals_separate_documents(arch, attn):
    """The composed-family contract: a pack under the 4D document mask with reset positions computes
    exactly the per-token losses of each document run on its own."""
    model = tiny_lm(arch, attn)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 101, (n,), generator=gen) for n in (9, 4, 17, 1, 6)]
    lengths = [len(d) for d in docs]
    ids = torch.cat(docs).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=document_attention_mask(lengths, torch.float32),
                       position_ids=pack_position_ids(lengths)).logits[0]
        separate = [model(input_ids=d.unsqueeze(0)).logits[0] for d in docs]
    starts = np.cumsum([0] + lengths[:-1]).tolist()
    for doc, start, alone in zip(docs, starts, separate):
        mine = packed[start : start + len(doc)]
        torch.testing.assert_close(mine, alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(next_token_losses(mine, doc), next_token_losses(alone, doc), atol=1e-5, rtol=0)

    # HF's own labels= loss with pack_labels: the token-weighted mean of the per-document losses.
    labels = pack_labels([d.tolist() for d in docs])
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=document_attention_mask(lengths, torch.float32),
                     position_ids=pack_position_ids(lengths), labels=labels).loss
    total = sum(next_token_losses(a, d).sum() for a, d in zip(separate, docs))
    count = sum(len(d) - 1 for d in docs)
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=0)


def test_packed_backward_matches_separate_documents():
    """Gradients agree too: a pack trains the same as its documents one by one."""
    model = tiny_lm("llama", "sdpa")
    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 101, (n,), generator=gen) for n in (7, 12, 5)]
    lengths = [len(d) for d in docs]
    labels = pack_labels([d.tolist() for d in docs])
    n_labels = int((labels != IGNORE_INDEX).sum())

    model.zero_grad()
    loss = model(input_ids=torch.cat(docs)[None], attention_mask=document_attention_mask(lengths),
                 position_ids=pack_position_ids(lengths), labels=labels).loss
    loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    for d in docs:
        logits = model(input_ids=d[None]).logits[0]
        (next_token_losses(logits, d).sum() / n_labels).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
