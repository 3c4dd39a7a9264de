"""``vlmtrain cache``: fill a run's feature cache with every frame of its data before training.

Training fills the cache online as well (``features/source.py``); precomputing first makes the very
first epoch read features instead of running the frozen encoder, and lets one cache directory serve
many runs (``features.cache_dir``) that share the encoder weights and preprocessing.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from vlmtrain.features.fingerprint import frame_keys
from vlmtrain.features.source import FeatureSource
from vlmtrain.models.protocol import VLM
from vlmtrain.models.spatial import spatial_branch, unfused

log = logging.getLogger("vlmtrain")

# Frames encoded per forward while precomputing.
DEFAULT_CHUNK = 256


@torch.no_grad()
def precompute_features(model: VLM, source: FeatureSource, frames, device: torch.device,
                        chunk: int = DEFAULT_CHUNK, limit: Optional[int] = None) -> dict:
    """Encode every frame of ``frames`` (an (N, 3, H, W) uint8 tensor or ``LazyFrames``) that the
    cache does not hold yet, in chunks of ``chunk`` frames, and store the features.

    Returns counts: frames seen, distinct frames, frames encoded, frames already cached, entries in the
    cache afterwards, seconds. Identical frames (same content key) are encoded once. A model with a
    spatial branch fills the branch's cache too (``spatial_encoded``, ``spatial_entries``).
    """
    branch = spatial_branch(model)
    if source.cache is None and source.spatial_cache is None:
        raise ValueError("no feature cache to fill (features.cache is off, or the producers train)")
    base = unfused(model)
    producers = base.feature_producers(source.split) if source.cache is not None else []
    modes = [m.training for m in producers]
    for m in producers:
        m.eval()
    t0 = time.perf_counter()
    total = len(frames) if limit is None else min(limit, len(frames))
    seen: set[str] = set()
    encoded = cached = spatial_encoded = 0
    try:
        for start in range(0, total, chunk):
            pixels = frames[torch.arange(start, min(start + chunk, total))]
            keys = frame_keys(pixels)
            rows = []
            for i, key in enumerate(keys):  # first occurrence of each key in the whole pass
                if key not in seen:
                    seen.add(key)
                    rows.append(i)
            if branch is not None and source.spatial_cache is not None and rows:
                hits, _ = source.spatial_cache.lookup([keys[i] for i in rows])
                todo = [r for r, hit in zip(rows, hits.tolist()) if not hit]
                if todo:
                    feats = branch.encode(branch.prepare(pixels[torch.tensor(todo)]).to(device))
                    source.spatial_cache.put([keys[i] for i in todo], feats)
                    spatial_encoded += len(todo)
            if source.cache is None:
                continue
            hits, _ = source.cache.lookup([keys[i] for i in rows]) if rows else (torch.zeros(0, dtype=torch.bool), None)
            todo = [r for r, hit in zip(rows, hits.tolist()) if not hit]
            cached += len(rows) - len(todo)
            if not todo:
                continue
            sel = pixels[torch.tensor(todo)]
            inputs = base.prepare_frames(sel).to(device)
            feats = base.encode_vision(inputs) if source.split else base.encode_images(inputs)
            source.cache.put([keys[i] for i in todo], feats)
            encoded += len(todo)
    finally:
        for m, mode in zip(producers, modes):
            m.train(mode)
    out = {"frames": total, "distinct_frames": len(seen), "seconds": round(time.perf_counter() - t0, 2)}
    if source.cache is not None:
        source.cache.flush()
        out.update(encoded=encoded, already_cached=cached, entries=int(source.cache.stats["entries"]))
    if source.spatial_cache is not None:
        source.spatial_cache.flush()
        out.update(spatial_encoded=spatial_encoded, spatial_entries=int(source.spatial_cache.stats["entries"]))
    log.info("feature cache: %s", out)
    return out
