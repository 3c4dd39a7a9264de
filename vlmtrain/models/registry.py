"""Which adapter class serves which HF family, and loading one from a local model directory.

The adapter modules import their HF classes, so they are imported only when a family is loaded.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional

from vlmtrain.models.hf_base import HFVLMAdapter

# family (= config.json model_type) -> "module:class" of its adapter.
ADAPTERS: dict[str, str] = {
    "qwen2_vl": "vlmtrain.models.qwen_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "vlmtrain.models.qwen_vl:Qwen25VLAdapter",
    "qwen3_vl": "vlmtrain.models.qwen_vl:Qwen3VLAdapter",
    "idefics3": "vlmtrain.models.idefics3:Idefics3Adapter",
    "llava": "vlmtrain.models.llava:LlavaAdapter",
}


def model_type_of(path: str | Path) -> str:
    """``model_type`` of the HF checkpoint in the local directory ``path`` (from config.json)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model.path={path}: no config.json (expected a local HF model directory)")
    model_type = json.loads(config.read_text()).get("model_type")
    if not model_type:
        raise ValueError(f"{config}: no model_type")
    return str(model_type)


def adapter_class(family: str) -> type[HFVLMAdapter]:
    """The adapter class of ``family`` (one of ``ADAPTERS``)."""
    if family not in ADAPTERS:
        raise ValueError(f"no adapter for model family {family!r}; supported: {sorted(ADAPTERS)}")
    module, name = ADAPTERS[family].split(":")
    return getattr(importlib.import_module(module), name)


def load_adapter(family: str, path: str | Path, frame_size: Optional[int] = None) -> HFVLMAdapter:
    """Load the HF VLM in ``path`` behind its adapter; ``family="auto"`` reads it from config.json.

    ``frame_size`` is the square side every frame is resized to (None: the adapter's default). An
    explicit family must match the checkpoint's model_type: loading weights into another
    architecture would fail late, or worse, half-succeed.
    """
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path={path}: not a directory (expected a local HF model directory)")
    found = model_type_of(path)
    if family != "auto" and found != family:
        raise ValueError(f"model.family={family} but model.path={path} holds a {found!r} model "
                         f"(set model.family={found} or auto)")
    size = (frame_size, frame_size) if frame_size else None
    return adapter_class(found).from_pretrained(path, frame_size=size)
