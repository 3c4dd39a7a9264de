"""Building and loading a model of any family: the only place that maps a family name to a class.

``build_model`` makes the model a run trains (the composed VLM around a tokenizer trained on the
run's conversations, or the HF VLM in ``model.path`` behind its adapter); ``load_final`` reads back
what ``VLM.save_final`` wrote. The adapter modules import their HF classes, so they are imported
only when a family is loaded.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

from vlmtrain.models.composed import META as COMPOSED_META
from vlmtrain.models.composed import ComposedVLM, build_composed_vlm
from vlmtrain.models.composed_chat import load_tokenizer, tokenizer_from_conversations
from vlmtrain.models.hf_base import HFVLMAdapter
from vlmtrain.models.protocol import VLM, Turn
from vlmtrain.models.spatial import SPATIAL_DIR, SPATIAL_META, SpatialVLM, has_saved_branch, load_branch

COMPOSED = "composed"  # the family built from model.* instead of loaded from model.path

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


def build_tokenizer(mcfg, conversations: Optional[Iterable[Sequence[Turn]]],
                    saved_dir: Optional[Path] = None):
    """The tokenizer a new model of ``model.family`` is built around, or None when the family brings
    its own (an HF checkpoint's). Composed: the one saved in ``saved_dir`` when there is one (a
    resumed run, the other ranks of a run), else one trained on the text of ``conversations``
    (read only then; None: the saved one must exist)."""
    if mcfg.family != COMPOSED:
        return None
    if saved_dir is not None and (Path(saved_dir) / "tokenizer.json").is_file():
        return load_tokenizer(saved_dir)
    if conversations is None:
        raise FileNotFoundError(f"{saved_dir}: no tokenizer.json (the run's tokenizer, needed to rebuild its model)")
    return tokenizer_from_conversations(conversations, mcfg.vocab_size)


def build_model(mcfg, image_size: int, max_frame_slots: int, tokenizer=None) -> VLM:
    """The model a run trains, from ``model.*`` (a builder: the model config stops here).

    Composed: randomly initialised (seed first) at ``image_size`` around ``tokenizer``
    (``build_tokenizer``); ``max_frame_slots`` sizes its frame-age embedding. HF families: the
    checkpoint in ``model.path`` at ``model.frame_size``.
    """
    if mcfg.family == COMPOSED:
        if tokenizer is None:
            raise ValueError("the composed model is built around a tokenizer: pass build_tokenizer(...)")
        return build_composed_vlm(mcfg, image_size, tokenizer, max_frame_slots)
    return load_adapter(mcfg.family, mcfg.path, mcfg.frame_size or None)


def load_base_final(directory: str | Path, family: str = "auto", frame_size: Optional[int] = None) -> VLM:
    """The model ``save_final`` wrote into ``directory`` without its spatial branch, in eval mode:
    the composed model, or the HF checkpoint of ``family`` (``auto``: its config.json's) with frames
    of side ``frame_size`` (None: the adapter's default)."""
    directory = Path(directory)
    if (directory / COMPOSED_META).is_file():
        return ComposedVLM.from_pretrained(directory).eval()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no saved model (no {COMPOSED_META} or config.json)")
    return load_adapter(family if family != COMPOSED else "auto", directory, frame_size or None).eval()


def load_final(directory: str | Path, mcfg) -> VLM:
    """The model ``save_final`` wrote into ``directory`` (a run's ``model/``), in eval mode, its
    spatial branch included when it has one (``models/spatial.py``); an HF model's frames are sized
    as in training (``model.frame_size``)."""
    model = load_base_final(directory, mcfg.family, mcfg.frame_size or None)
    return load_branch(model, directory).eval() if has_saved_branch(directory) else model


def load_spatial_model(directory: str | Path, encoder_path: Optional[str | Path] = None, family: str = "auto",
                       frame_size: Optional[int] = None) -> SpatialVLM:
    """The fused model ``vlmtrain export --merged`` (or a run's ``model/``) wrote for inference, in eval
    mode: the merged base model (``models.registry.load_final``'s rules), its encoder from the saved
    reference (or ``encoder_path``: the same weights elsewhere), and the trained projector."""
    if not has_saved_branch(directory):
        raise FileNotFoundError(f"{directory}: no {SPATIAL_DIR}/{SPATIAL_META} (not a model with a spatial branch)")
    base = load_base_final(directory, family, frame_size)
    return load_branch(base, directory, encoder_path).eval()
