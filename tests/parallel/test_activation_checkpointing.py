"""Per-part activation checkpointing: HF's switch on the right sub-models, results unchanged."""

from __future__ import annotations

import pytest
import torch

from vlmtrain.config import RunConfig
from vlmtrain.data.loader import collate
from vlmtrain.data.samples import TokenizedSample
from vlmtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from vlmtrain.models.composed import build_composed_vlm
from vlmtrain.models.protocol import Turn
from vlmtrain.models.registry import load_adapter
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
from vlmtrain.train.step import batch_loss


def _flags(model) -> dict[str, bool]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return {n: m.gradient_checkpointing for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)}


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model, batch, torch.device("cpu"))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_adapter_parts_checkpoint_with_identical_loss_and_grads(tmp_path):
    adapter = load_adapter("auto", save_tiny_qwen_vl(tmp_path / "q", family="qwen2_vl"), frame_size=32)
    enc = adapter.encode_conversation([Turn("user", "<image><image> go"), Turn("assistant", "left")])
    sample = TokenizedSample(enc.input_ids, enc.labels, (0, 1))
    frames = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    batch = collate([sample, sample], frames, adapter.tokenizer.pad_token_id, adapter.image_token_id)
    adapter.train()
    loss, grads = _loss_and_grads(adapter, batch)

    with pytest.raises(ValueError, match="projector.*no layer that supports"):
        apply_activation_checkpointing(adapter, ["projector"])
    assert apply_activation_checkpointing(adapter, ["llm"]) == ["hf.model.language_model"]
    flags = _flags(adapter)
    assert all(on == (".language_model." in n) for n, on in flags.items()), flags
    assert apply_activation_checkpointing(adapter, ["vision"]) == ["hf.model.visual"]
    assert all(_flags(adapter).values())
    loss_ckpt, grads_ckpt = _loss_and_grads(adapter, batch)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7)


def test_composed_model_parts(chat_tokenizer):
    model = build_composed_vlm(RunConfig().model, 32, chat_tokenizer, 9)
    assert apply_activation_checkpointing(model, ["vision", "llm"]) == ["vision", "lm.model"]
    assert all(_flags(model).values())
    with pytest.raises(ValueError, match="projector"):
        apply_activation_checkpointing(model, ["projector"])

