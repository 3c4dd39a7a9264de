"""Write a tiny random HF VLM (model, tokenizer, PIL image processor) to a directory, offline.

    python scripts/make_tiny_vlm.py --family qwen2_5_vl --out models/tiny_qwen2_5_vl
    python scripts/make_tiny_vlm.py --family dinov2 --out models/tiny_dinov2   # a spatial encoder

The directory loads like a real checkpoint (``model.path`` of the example configs in configs/), so a
whole training run can be tried in seconds on a CPU. Weights are random: the loss falls, nothing
more is to be expected of them.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Callable

from vlmtrain.models.tiny_idefics3 import save_tiny_idefics3
from vlmtrain.models.tiny_llava import save_tiny_llava
from vlmtrain.models.tiny_qwen import FAMILIES as QWEN_FAMILIES
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
from vlmtrain.models.tiny_spatial import save_tiny_dinov2

# family -> builder(out_dir, seed); every family has a tiny builder in vlmtrain/models/tiny_*.py.
BUILDERS: dict[str, Callable[..., Path]] = {
    **{family: partial(save_tiny_qwen_vl, family=family) for family in QWEN_FAMILIES},
    "idefics3": save_tiny_idefics3,
    "llava": partial(save_tiny_llava, text="llama"),
    "dinov2": save_tiny_dinov2,  # a spatial encoder for model.spatial_encoder (the JanusVLN recipe)
}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the tiny model."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, choices=sorted(BUILDERS), help="model family (config.json model_type)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    out = BUILDERS[args.family](Path(args.out), seed=args.seed)
    print(f"wrote a tiny random {args.family} model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
