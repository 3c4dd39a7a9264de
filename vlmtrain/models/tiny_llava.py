"""Tiny random LLaVA checkpoints (SigLIP vision tower + Llama or Qwen2 LM) for tests, offline.

Also holds the helpers the tiny Idefics3 builder shares: a byte-level BPE tokenizer trained on a few
sentences with the family's special tokens first (so their ids are small and known before the
model config is written) and a tiny text-model config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast,
                          SiglipImageProcessorPil)

# Navigation-flavoured sentences: enough for a few hundred BPE merges over the byte alphabet.
CORPUS = (
    "User: where is the red door? Assistant: turn left and go forward.",
    "The robot walks down the hallway toward the kitchen.",
    "Move forward two steps, then turn right at the blue chair.",
    "Stop when you reach the green box next to the window.",
    "What do you see in this image? I see a door, a wall and a table.",
    "Go back to the start and look around the room.",
)
TINY_IMAGE_SIZE = 32
TINY_PATCH = 8


def train_tiny_tokenizer(special_tokens: Sequence[str], bos: str | None, eos: str, pad: str,
                         vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``CORPUS``; ``special_tokens`` get ids 0, 1, 2, ...

    ``bos``/``eos``/``pad`` must be among ``special_tokens``; the others become extra special tokens
    (never split, never merged). No post-processor: adapters add bos themselves.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    named = {t for t in (bos, eos, pad) if t is not None}
    extra = [t for t in special_tokens if t not in named]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   extra_special_tokens=extra)


def tiny_text_config(kind: str, tokenizer: PreTrainedTokenizerFast) -> dict:
    """A 2-layer, 64-wide ``kind`` ("llama" or "qwen2") text config sized to ``tokenizer``."""
    if kind not in ("llama", "qwen2"):
        raise ValueError(f"unsupported tiny text model {kind!r} (llama or qwen2)")
    return dict(
        model_type=kind, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )


def tiny_vision_config(model_type: str, patch_size: int) -> dict:
    """A 2-layer, 32-wide SigLIP-style vision config on 32x32 images."""
    return dict(model_type=model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=patch_size)


def save_tiny_llava(out_dir: str | Path, text: str = "llama", seed: int = 0,
                    feature_strategy: str = "full") -> Path:
    """Write a tiny random LLaVA (SigLIP tower, ``text`` LM) with tokenizer and PIL SigLIP image
    processor to ``out_dir``; loadable offline with ``AutoModelForImageTextToText``/``AutoTokenizer``.

    ``feature_strategy`` is the config's ``vision_feature_select_strategy``: "full" keeps all 16
    patch tokens (right for SigLIP), "default" drops the first one as HF does for CLIP's CLS token.
    """
    out = Path(out_dir)
    if text == "llama":
        tokenizer = train_tiny_tokenizer(["<pad>", "<s>", "</s>", "<image>"], bos="<s>", eos="</s>",
                                         pad="<pad>")
    else:  # Qwen2 tokenizers have no bos token; the adapter must cope without one
        tokenizer = train_tiny_tokenizer(["<|endoftext|>", "<|im_end|>", "<image>"], bos=None,
                                         eos="<|im_end|>", pad="<|endoftext|>")
    num_patches = (TINY_IMAGE_SIZE // TINY_PATCH) ** 2
    config = LlavaConfig(
        vision_config=tiny_vision_config("siglip_vision_model", TINY_PATCH),
        text_config=tiny_text_config(text, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=num_patches - (1 if feature_strategy == "default" else 0),
        vision_feature_select_strategy=feature_strategy,
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(out)
    return out
