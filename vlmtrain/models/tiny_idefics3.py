"""Tiny random Idefics3 / SmolVLM checkpoints for tests, offline.

32x32 images with 4x4 patches (an 8x8 grid) and scale_factor 2, so the pixel shuffle is not trivial
and one frame becomes K = 64 / 4 = 16 LM tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil

from vlmtrain.models.tiny_llava import (TINY_IMAGE_SIZE, tiny_text_config, tiny_vision_config,
                                        train_tiny_tokenizer)

TINY_IDEFICS3_PATCH = 4
# SmolVLM's special tokens (bos as in SmolVLM: <|im_start|>, eos the end of an utterance).
SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                  "<image>", "<global-img>")


def save_tiny_idefics3(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Idefics3 (Llama LM) with tokenizer and PIL image processor to ``out_dir``;
    loadable offline with ``AutoModelForImageTextToText``/``AutoTokenizer``/``AutoImageProcessor``."""
    out = Path(out_dir)
    tokenizer = train_tiny_tokenizer(SPECIAL_TOKENS, bos="<|im_start|>", eos="<end_of_utterance>",
                                     pad="<pad>")
    config = Idefics3Config(
        vision_config={k: v for k, v in tiny_vision_config("idefics3_vision", TINY_IDEFICS3_PATCH).items()
                       if k != "model_type"},
        text_config=tiny_text_config("llama", tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Splitting stays off by default here; the adapter turns it off explicitly for any checkpoint.
    Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": TINY_IMAGE_SIZE},
                              max_image_size={"longest_edge": TINY_IMAGE_SIZE}).save_pretrained(out)
    return out
