"""Input-side helpers of the Qwen-VL adapters (``models/qwen_vl.py``): frame size, images, ids.

Kept apart so ``qwen_vl.py`` holds only the adapter logic; nothing here touches a model.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

# Default frame side in merged tokens: 16 x 16 = 256 visual tokens per frame (448 px for Qwen2/2.5-VL,
# 512 px for Qwen3-VL), the size Qwen-VL models are commonly fine-tuned at for multi-frame inputs.
DEFAULT_TOKENS_PER_SIDE = 16


def resolve_frame_size(frame_size: Optional[int | tuple[int, int]], factor: int) -> tuple[int, int]:
    """``frame_size`` as (height, width), checked to be positive multiples of ``factor``
    (= patch_size * merge_size); None gives the default square of ``DEFAULT_TOKENS_PER_SIDE`` tokens."""
    if frame_size is None:
        side = DEFAULT_TOKENS_PER_SIDE * factor
        return side, side
    if isinstance(frame_size, int):
        frame_size = (frame_size, frame_size)
    h, w = int(frame_size[0]), int(frame_size[1])
    if h <= 0 or w <= 0 or h % factor or w % factor:
        near = tuple(max(factor, round(x / factor) * factor) for x in (h, w))
        raise ValueError(f"frame_size={(h, w)} must be positive multiples of patch_size * merge_size = "
                         f"{factor} for this model (nearest valid: {near})")
    return h, w


def special_token_id(tokenizer, token: str) -> int:
    """Id of a special token that must exist in the vocabulary (no silent fallback to unk)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id
                       and token != tokenizer.unk_token):
        raise ValueError(f"tokenizer has no {token} token; is this a Qwen-VL tokenizer?")
    return int(tid)


def check_processor_matches(processor: Qwen2VLImageProcessorPil, vision_config) -> None:
    """The image processor's patching must match the vision tower's, or patches are garbage."""
    for proc_key, cfg_key in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                              ("temporal_patch_size", "temporal_patch_size")):
        if int(getattr(processor, proc_key)) != int(getattr(vision_config, cfg_key)):
            raise ValueError(f"image processor {proc_key}={getattr(processor, proc_key)} differs from "
                             f"vision_config.{cfg_key}={getattr(vision_config, cfg_key)}")


def to_rgb_pil(image) -> Image.Image:
    """An RGB PIL image from a PIL image or an HWC uint8 array."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return image.convert("RGB")
