"""Export a finished (or interrupted) HF-family run: rebuild its model from the run's config and
newest checkpoint, then write a merged HF checkpoint and/or a PEFT adapter (``models/export.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vlmtrain.config import load_config
from vlmtrain.models.export import export_adapter, export_merged
from vlmtrain.models.hf_base import HFVLMAdapter
from vlmtrain.train.checkpoint import latest_checkpoint, load_model_state
from vlmtrain.train.loop import build_model


def load_trained_adapter(run_dir: str | Path) -> HFVLMAdapter:
    """The run's HF adapter (LoRA layers included) with the weights of its newest checkpoint, in eval mode."""
    run_dir = Path(run_dir)
    cfg = load_config(yaml_path=run_dir / "config.yaml")
    if cfg.model.family == "composed":
        raise ValueError(f"{run_dir}: a composed-model run; its model/ directory already is the export")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no checkpoint to export")
    model = build_model(cfg)
    load_model_state(model, ckpt)
    return model.eval()


def export_run(run_dir: str | Path, merged: Optional[str | Path] = None, adapter: Optional[str | Path] = None,
               overwrite: bool = False) -> list[Path]:
    """Write the run's merged HF checkpoint to ``merged`` and/or its PEFT adapter (plus the fully
    trained modules) to ``adapter``; returns the written directories."""
    if merged is None and adapter is None:
        raise ValueError("nothing to export: give a merged and/or an adapter output directory")
    model = load_trained_adapter(run_dir)
    written = []
    if merged is not None:
        written.append(export_merged(model, merged, overwrite=overwrite))
    if adapter is not None:
        written.append(export_adapter(model, adapter, overwrite=overwrite))
    return written
