"""The memory-lean loss equals HF's own causal-LM loss, chunked or not, with the same gradients."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlmtrain.models.loss import IGNORE_INDEX, labelled_cross_entropy


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX  # a prompt
    labels[2, 15:] = IGNORE_INDEX  # padding
    return ids, labels


@pytest.mark.parametrize("chunk", [4096, 5, 1])
def test_equals_hf_loss_and_gradients(lm, chunk):
    ids, labels = _batch()
    lm.zero_grad()
    ref = lm(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grad = lm.lm_head.weight.grad.clone()
    lm.zero_grad()
    hidden = lm.model(input_ids=ids).last_hidden_state
    ours = labelled_cross_entropy(hidden, lm.lm_head, labels, chunk_tokens=chunk)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm.lm_head.weight.grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_no_labels_gives_connected_zero(lm):
    ids, _ = _batch()
    hidden = lm.model(input_ids=ids).last_hidden_state
    loss = labelled_cross_entropy(hidden, lm.lm_head, torch.full_like(ids, IGNORE_INDEX))
    assert loss.item() == 0.0 and loss.requires_grad
