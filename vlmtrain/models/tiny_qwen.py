"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints for tests and smoke runs (no download).

``save_tiny_qwen_vl`` writes a directory that loads like a real Qwen-VL checkpoint with
``AutoModelForImageTextToText.from_pretrained``, ``AutoTokenizer.from_pretrained`` and
``Qwen2VLImageProcessorPil.from_pretrained``: a random 2-layer model, a byte-level BPE tokenizer
trained on a few sentences that holds the family's special tokens (ids matching the model config)
and the PIL image processor config. One forward takes a few milliseconds on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

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


@dataclass(frozen=True)
class QwenVLSize:
    """Sizes of a random Qwen-VL checkpoint. The defaults are the test size (one forward in a few
    milliseconds); :data:`BENCH_SIZE` is the benchmark workload's (docs/benchmarks.md)."""

    lm_hidden: int = _LM_HIDDEN  # text width
    lm_layers: int = 2  # text depth
    lm_heads: int = _LM_HIDDEN // _HEAD_DIM  # text attention heads
    lm_kv_heads: int = 2  # text key/value heads
    lm_intermediate: int = 128  # text MLP width
    vocab_size: int = 0  # embedding rows (0: the tokenizer's size rounded up to 64)
    tokenizer_vocab: int = 320  # BPE vocabulary trained for the tokenizer
    vision_depth: int = 2  # vision blocks
    vision_hidden: int = 32  # vision width
    vision_heads: int = 2  # vision attention heads
    vision_intermediate: int = 64  # vision MLP width
    patch: int = _PATCH  # pixels per patch side
    merge: int = _MERGE  # spatial merge (merged tokens = patches / merge^2)
    window_size: int = 16  # Qwen2.5-VL window attention, in pixels
    init_std: float = _INIT_STD  # initializer range


TEST_SIZE = QwenVLSize()
# The issue-11 workload: text 256 x 4 layers (4 heads / 2 KV, MLP 512, vocab 4096), vision 128 x 4
# (patch 14, merge 2: 16 visual tokens per 112 px frame); 5.7 M parameters with Qwen2.5-VL. HF's
# initializer range, as a real checkpoint's statistics would be closer to than the tests' 0.2.
BENCH_SIZE = QwenVLSize(lm_hidden=256, lm_layers=4, lm_heads=4, lm_kv_heads=2, lm_intermediate=512,
                        vocab_size=4096, tokenizer_vocab=4096, vision_depth=4, vision_hidden=128,
                        vision_heads=4, vision_intermediate=256, patch=14, merge=2, window_size=112,
                        init_std=0.02)


def build_tiny_tokenizer(vocab_size: int = 320, corpus: Optional[Iterable[str]] = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the Qwen-VL special tokens at ids 0..len(SPECIAL_TOKENS)-1,
    trained on ``corpus`` (default: a few fixed sentences)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else _CORPUS), trainer=trainer)
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


def _mrope_section(family: str, head_dim: int) -> list[int]:
    # mrope_section splits the head_dim/2 rotary frequencies into (t, h, w) groups (Qwen's own
    # checkpoints: 16/24/24 of 64); Qwen3-VL interleaves them.
    half = head_dim // 2
    if family == "qwen3_vl":
        return [half - 2 * (half // 4), half // 4, half // 4]
    hw = (3 * half) // 8
    return [half - 2 * hw, hw, hw]


def _text_config(family: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast, size: QwenVLSize) -> dict[str, Any]:
    head_dim = size.lm_hidden // size.lm_heads
    section = _mrope_section(family, head_dim)
    cfg: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": size.lm_hidden, "intermediate_size": size.lm_intermediate,
        "num_hidden_layers": size.lm_layers, "num_attention_heads": size.lm_heads,
        "num_key_value_heads": size.lm_kv_heads,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "initializer_range": size.init_std,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "qwen3_vl":
        cfg["head_dim"] = head_dim
        cfg["rope_parameters"]["mrope_interleaved"] = True
    return cfg


def _vision_config(family: str, size: QwenVLSize) -> dict[str, Any]:
    common = {"depth": size.vision_depth, "num_heads": size.vision_heads, "in_channels": 3,
              "patch_size": size.patch, "spatial_merge_size": size.merge, "temporal_patch_size": 2,
              "initializer_range": size.init_std}
    last = size.vision_depth - 1
    if family == "qwen2_vl":
        # Qwen2-VL names the vision width embed_dim and the merger output (= LM width) hidden_size.
        return {**common, "embed_dim": size.vision_hidden, "hidden_size": size.lm_hidden,
                "mlp_ratio": size.vision_intermediate // size.vision_hidden}
    if family == "qwen2_5_vl":
        # window_size is in pixels: at the test size 16 px = 2x2 merged tokens, so a 32 px frame has 4
        # windows and the windowed / full attention split (the last block full) is exercised.
        return {**common, "hidden_size": size.vision_hidden, "intermediate_size": size.vision_intermediate,
                "out_hidden_size": size.lm_hidden, "window_size": size.window_size, "fullatt_block_indexes": [last]}
    # Qwen3-VL: learned 8x8 position grid (interpolated to the frame grid) and deepstack levels.
    return {**common, "hidden_size": size.vision_hidden, "intermediate_size": size.vision_intermediate,
            "out_hidden_size": size.lm_hidden, "num_position_embeddings": 64,
            "deepstack_visual_indexes": list(range(min(2, size.vision_depth)))}


_CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}


def save_tiny_qwen_vl(out_dir: str | Path, family: str = "qwen2_5_vl", seed: int = 0,
                      size: QwenVLSize = TEST_SIZE, corpus: Optional[Iterable[str]] = None) -> Path:
    """Write a random ``family`` checkpoint (model, tokenizer, PIL image processor) of ``size`` to
    ``out_dir``, the tokenizer trained on ``corpus`` (default: a few fixed sentences).

    Returns ``out_dir`` as a Path. Deterministic for a given ``seed``.
    """
    if family not in _CLASSES:
        raise ValueError(f"unknown Qwen-VL family {family!r}; expected one of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(size.tokenizer_vocab, corpus)
    # Round the embedding table up like the real checkpoints do (vocab > tokenizer size).
    vocab_size = max(size.vocab_size, -(-len(tokenizer) // 64) * 64)

    config_cls, model_cls = _CLASSES[family]
    config = config_cls(
        text_config=_text_config(family, vocab_size, tokenizer, size), vision_config=_vision_config(family, size),
        # Qwen3-VL's small checkpoints tie lm_head to the embeddings; keep that path covered.
        tie_word_embeddings=family == "qwen3_vl", **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # Qwen3-VL uses (x - 0.5) / 0.5; Qwen2/2.5-VL the CLIP mean/std (the processor default).
    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3_vl" else {}
    unit = size.patch * size.merge
    processor = Qwen2VLImageProcessorPil(
        patch_size=size.patch, merge_size=size.merge, temporal_patch_size=2,
        min_pixels=unit ** 2, max_pixels=(unit * 64) ** 2, **norm,
    )
    processor.save_pretrained(out)
    return out
