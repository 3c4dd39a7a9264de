"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints for tests and smoke runs (no download).

``save_tiny_qwen_vl`` writes a directory that loads like a real Qwen-VL checkpoint with
``AutoModelForImageTextToText.from_pretrained``, ``AutoTokenizer.from_pretrained`` and
``Qwen2VLImageProcessorPil.from_pretrained``: a random 2-layer model, a byte-level BPE tokenizer
trained on a few sentences that holds the family's special tokens (ids matching the model config)
and the PIL image processor config. One forward takes a few milliseconds on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Special tokens in the order they get ids 0.. (Qwen puts them after its 151k BPE tokens; the order
# inside the tiny vocabulary does not matter as long as the model config names the same ids).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# A few sentences so the BPE learns some merges; byte-level pre-tokenisation keeps any text encodable.
_CORPUS = (
    "You are a helpful assistant. Describe the image in one sentence.",
    "The robot moves forward 25 centimeters, then turns left 15 degrees.",
    "Walk down the hallway and stop next to the wooden door on the right.",
    "What do you see? I see a red chair, a table and a window.",
    "system user assistant: the answer is STOP, FORWARD, LEFT or RIGHT.",
)

# Sizes: LM width 64, 4 heads of 16 (half rotary dim 8), vision width 32 with 4-pixel patches.
_LM_HIDDEN = 64
_HEAD_DIM = 16
_PATCH = 4
_MERGE = 2
# Larger than HF's 0.02 so that positions, slots and deepstack visibly change the loss: with 0.02 a
# tiny model's attention is nearly uniform and MRoPE mistakes move the loss by < 1e-5, which an
# adapter-vs-HF test at fp32 tolerance could not catch.
_INIT_STD = 0.2


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the Qwen-VL special tokens at ids 0..len(SPECIAL_TOKENS)-1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }


def _text_config(family: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    # mrope_section splits the 8 rotary frequencies into (t, h, w) groups; Qwen3-VL interleaves them.
    section = [4, 2, 2] if family == "qwen3_vl" else [2, 3, 3]
    cfg: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": _LM_HIDDEN, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": _LM_HIDDEN // _HEAD_DIM, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "initializer_range": _INIT_STD,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "qwen3_vl":
        cfg["head_dim"] = _HEAD_DIM
        cfg["rope_parameters"]["mrope_interleaved"] = True
    return cfg


def _vision_config(family: str) -> dict[str, Any]:
    common = {"depth": 2, "num_heads": 2, "in_channels": 3, "patch_size": _PATCH,
              "spatial_merge_size": _MERGE, "temporal_patch_size": 2, "initializer_range": _INIT_STD}
    if family == "qwen2_vl":
        # Qwen2-VL names the vision width embed_dim and the merger output (= LM width) hidden_size.
        return {**common, "embed_dim": 32, "hidden_size": _LM_HIDDEN, "mlp_ratio": 2}
    if family == "qwen2_5_vl":
        # window_size is in pixels: 16 px = 2x2 merged tokens, so a 32 px frame has 4 windows and the
        # windowed / full attention split of block 0 / block 1 is exercised.
        return {**common, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": _LM_HIDDEN,
                "window_size": 16, "fullatt_block_indexes": [1]}
    # Qwen3-VL: learned 8x8 position grid (interpolated to the frame grid) and two deepstack levels.
    return {**common, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": _LM_HIDDEN,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]}


_CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}


def save_tiny_qwen_vl(out_dir: str | Path, family: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Write a tiny random ``family`` checkpoint (model, tokenizer, PIL image processor) to ``out_dir``.

    Returns ``out_dir`` as a Path. Deterministic for a given ``seed``.
    """
    if family not in _CLASSES:
        raise ValueError(f"unknown Qwen-VL family {family!r}; expected one of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    # Round the embedding table up like the real checkpoints do (vocab > tokenizer size).
    vocab_size = -(-len(tokenizer) // 64) * 64

    config_cls, model_cls = _CLASSES[family]
    config = config_cls(
        text_config=_text_config(family, vocab_size, tokenizer), vision_config=_vision_config(family),
        # Qwen3-VL's small checkpoints tie lm_head to the embeddings; keep that path covered.
        tie_word_embeddings=family == "qwen3_vl", **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # Qwen3-VL uses (x - 0.5) / 0.5; Qwen2/2.5-VL the CLIP mean/std (the processor default).
    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3_vl" else {}
    processor = Qwen2VLImageProcessorPil(
        patch_size=_PATCH, merge_size=_MERGE, temporal_patch_size=2,
        min_pixels=(_PATCH * _MERGE) ** 2, max_pixels=(_PATCH * _MERGE * 64) ** 2, **norm,
    )
    processor.save_pretrained(out)
    return out
