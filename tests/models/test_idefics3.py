"""Idefics3/SmolVLM adapter: what only this family has. The checks it shares with LLaVA (the split
three-call loss equals the HF model's own forward, labels, parts, gradients) are in
``test_two_tower_adapters.py``."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, Idefics3Processor

from test_two_tower_adapters import IDEFICS3, assert_matches_hf, family_fixtures, images
from vlmtrain.models.idefics3 import Idefics3Adapter
from vlmtrain.models.protocol import Turn

family, tiny_path, adapter = family_fixtures([IDEFICS3])


def test_placeholders_and_pixels_match_hf_processor(adapter, tiny_path):
    """Our hand-built expansion equals what HF's Idefics3Processor writes for unsplit images."""
    processor = Idefics3Processor(
        image_processor=AutoImageProcessor.from_pretrained(tiny_path, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_path), image_seq_len=adapter.tokens_per_frame())
    frames = images(((32, 32), (32, 32)))  # already frame-sized: both resize paths are no-ops
    text = "<image> go <image>to the door"
    ref = processor(text=[f"User:{text}"], images=[frames], do_image_splitting=False, return_tensors="pt")
    enc = adapter.encode_conversation([Turn("user", text)])
    bos = [adapter.tokenizer.bos_token_id]
    tail = [adapter.tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    tail += adapter.tokenizer.encode("\n", add_special_tokens=False)
    assert enc.input_ids == bos + ref["input_ids"][0].tolist() + tail
    torch.testing.assert_close(adapter.preprocess(frames).pixels, ref["pixel_values"][0])


def test_frame_size_must_be_square_and_divisible(tiny_path):
    with pytest.raises(ValueError, match="square"):
        Idefics3Adapter.from_pretrained(tiny_path, frame_size=(32, 24))
    with pytest.raises(ValueError, match="divisible"):
        Idefics3Adapter.from_pretrained(tiny_path, frame_size=(36, 36))
    bigger = Idefics3Adapter.from_pretrained(tiny_path, frame_size=(48, 48))
    assert bigger.tokens_per_frame() == (48 // 4) ** 2 // 4
    assert_matches_hf(bigger)  # frames larger than the vision image_size still match HF
