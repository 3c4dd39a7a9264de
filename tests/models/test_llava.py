"""LLaVA adapter (SigLIP tower; Llama and Qwen2 LMs): what only this family has. The checks it shares
with Idefics3 (the split three-call loss equals HF's own forward, labels, parts, gradients) are in
``test_two_tower_adapters.py``."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

from test_two_tower_adapters import LLAVA, family_fixtures, images
from vlmtrain.models.llava import LlavaAdapter
from vlmtrain.models.protocol import Turn
from vlmtrain.models.tiny_llava import TINY_PATCH

family, tiny_path, adapter = family_fixtures(LLAVA)


def test_placeholders_and_pixels_match_hf_processor(adapter, tiny_path):
    """Our hand-built expansion and pixels equal what HF's LlavaProcessor produces."""
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(tiny_path, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_path), patch_size=TINY_PATCH,
        vision_feature_select_strategy=adapter.hf.config.vision_feature_select_strategy)
    frames = images()  # not frame-sized: the SigLIP processor resizes straight to 32x32 like we do
    text = "<image> go <image>to the door"
    ref = processor(text=[f"USER: {text}\n"], images=frames[:2], return_tensors="pt")
    enc = adapter.encode_conversation([Turn("user", text)])
    bos = [] if adapter.tokenizer.bos_token_id is None else [adapter.tokenizer.bos_token_id]
    assert enc.input_ids == bos + ref["input_ids"][0].tolist()
    torch.testing.assert_close(adapter.preprocess(frames[:2]).pixels, ref["pixel_values"])


def test_frame_size_must_match_the_vision_tower(tiny_path):
    with pytest.raises(ValueError, match="image_size"):
        LlavaAdapter.from_pretrained(tiny_path, frame_size=(48, 48))


def test_unreachable_trainable_are_exactly_the_parameters_without_gradients(tmp_path):
    """What DDP is told to expect without gradients (``find_unused``) is exactly what a backward
    through a trained LLaVA leaves without one: the layers after vision_feature_layer and post_layernorm."""
    from vlmtrain.data.loader import collate
    from vlmtrain.data.samples import TokenizedSample
    from vlmtrain.models.protocol import Turn
    from vlmtrain.models.registry import load_adapter
    from vlmtrain.models.tiny_llava import save_tiny_llava
    from vlmtrain.train.step import batch_loss

    adapter = load_adapter("llava", save_tiny_llava(tmp_path / "llava", text="llama"), None)
    enc = adapter.encode_conversation([Turn("user", "<image> where now?"), Turn("assistant", "STOP")])
    h, w = adapter.frame_size
    frames = torch.randint(0, 255, (1, 3, h, w), dtype=torch.uint8)
    batch = collate([TokenizedSample(enc.input_ids, enc.labels, [0])], frames, 0, adapter.image_token_id)
    batch_loss(adapter, batch, torch.device("cpu")).backward()
    no_grad = sorted(n for n, p in adapter.named_parameters() if p.requires_grad and p.grad is None)
    assert no_grad and sorted(adapter.unreachable_trainable()) == no_grad
