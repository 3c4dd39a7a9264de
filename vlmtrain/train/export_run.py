"""Export a finished (or interrupted) run: rebuild its model from the run's config, tokenizer and newest
checkpoint, then write the final model directory and/or a PEFT adapter (``models/export.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vlmtrain.config import load_config
from vlmtrain.models.export import export_adapter
from vlmtrain.models.protocol import VLM
from vlmtrain.models.registry import build_tokenizer
from vlmtrain.models.spatial import SPATIAL_DIR, spatial_branch, unfused
from vlmtrain.train.build import TOKENIZER_DIR, build_model, seed_everything
from vlmtrain.train.checkpoint import latest_checkpoint, load_model_state


def load_trained_model(run_dir: str | Path) -> VLM:
    """The run's model (LoRA layers included) with the weights of its newest checkpoint, in eval mode:
    built exactly as training built it (same seed, the run's saved tokenizer), then the checkpoint's
    trainable tensors loaded."""
    run_dir = Path(run_dir)
    cfg = load_config(yaml_path=run_dir / "config.yaml")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no checkpoint to export")
    seed_everything(cfg.seed)
    tokenizer = build_tokenizer(cfg.model, None, run_dir / TOKENIZER_DIR)
    model = build_model(cfg, tokenizer)
    load_model_state(model, ckpt)
    return model.eval()


def export_run(run_dir: str | Path, merged: Optional[str | Path] = None, adapter: Optional[str | Path] = None,
               overwrite: bool = False) -> list[Path]:
    """Write the run's final model (``save_final``: for an HF family a merged HF checkpoint) to
    ``merged`` and/or its PEFT adapter (plus the fully trained modules) to ``adapter``; returns the
    written directories. A model with a spatial branch gets ``spatial/`` (encoder reference, trained
    projector, fusion settings) in both: ``models.registry.load_spatial_model(merged)`` rebuilds it,
    and ``load_branch(load_adapter_export(base, adapter), adapter)`` from the adapter."""
    if merged is None and adapter is None:
        raise ValueError("nothing to export: give a merged and/or an adapter output directory")
    model = load_trained_model(run_dir)
    written = []
    if merged is not None:
        merged = Path(merged)
        if merged.exists() and any(merged.iterdir()) and not overwrite:
            raise FileExistsError(f"{merged} exists and is not empty (pass overwrite)")
        model.save_final(merged)
        written.append(merged)
    if adapter is not None:
        branch = spatial_branch(model)
        out = export_adapter(unfused(model), adapter, overwrite=overwrite)
        if branch is not None:  # the adapter alone would rebuild a model without its spatial branch
            branch.save(out / SPATIAL_DIR)
        written.append(out)
    return written
