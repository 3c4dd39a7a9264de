"""A tiny random DINOv2 backbone for the spatial branch (``models/spatial.py``) in tests and smoke runs.

``save_tiny_dinov2`` writes a directory that loads with ``AutoModel.from_pretrained`` like a real
DINOv2 checkpoint (``config.json``, ``model.safetensors``) plus the ``preprocessor_config.json`` mean
and std the branch normalises with. Random weights: it shows the recipe runs, not what geometry
features bring.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Dinov2Config, Dinov2Model


def save_tiny_dinov2(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2,
                     patch_size: int = 8, image_size: int = 32) -> Path:
    """Write a random ``hidden`` x ``layers`` DINOv2 (patch ``patch_size``, input ``image_size``) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=2,
                          patch_size=patch_size, image_size=image_size)
    Dinov2Model(config).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BitImageProcessor", "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225], "do_normalize": True, "do_rescale": True,
         "rescale_factor": 1 / 255, "size": {"shortest_edge": image_size}}, indent=2) + "\n")
    return out
