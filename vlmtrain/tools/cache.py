"""``vlmtrain cache``: build the config's model and data and fill its feature cache with every frame."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlmtrain.config import RunConfig
from vlmtrain.features.precompute import precompute_features
from vlmtrain.features.source import open_feature_source
from vlmtrain.models.spatial import spatial_branch
from vlmtrain.train.build import build_model_and_data, seed_everything


def fill_run_cache(cfg: RunConfig) -> dict:
    """Fill the run's feature cache (``features.cache_dir`` or ``output_dir/feature_cache``) with every
    frame of its data; returns the cache directory, whether it holds split (vision-encoder) features
    and the counts of ``precompute_features``.

    ``features.cache`` off or auto is taken as ``on`` here: a trained producer is an error that says
    which part trains (``FeatureCacheUnavailable``). With a spatial branch (``model.spatial_encoder``)
    the branch's cache is filled too, and alone when the main producers train."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    model, data = build_model_and_data(cfg, out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    # With a spatial branch its cache alone is worth filling when the main producers train.
    mode = "auto" if spatial_branch(model) is not None else "on"
    source = open_feature_source(dataclasses.replace(cfg.features, cache=mode), model, out_dir)
    try:
        counts = precompute_features(model, source, data.frames, device)
    finally:
        source.close()
    out = {"cache_dir": str(source.cache.root) if source.cache is not None else None, "split": source.split}
    if source.spatial_cache is not None:
        out["spatial_cache_dir"] = str(source.spatial_cache.root)
    return {**out, **counts}
