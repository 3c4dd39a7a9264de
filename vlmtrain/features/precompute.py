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

log = logging.getLogger("vlmtrain")

# Frames encoded per forward while precomputing.
DEFAULT_CHUNK = 256


@torch.no_grad()
def precompute_features(model: VLM, source: FeatureSource, frames, device: torch.device,
                        chunk: int = DEFAULT_CHUNK, limit: Optional[int] = None) -> dict:
    """Encode every frame of ``frames`` (an (N, 3, H, W) uint8 tensor or ``LazyFrames``) that the
    cache does not hold yet, in chunks of ``chunk`` frames, and store the features.

    Returns counts: frames seen, distinct frames, frames encoded, frames already cached, entries in the
    cache afterwards, seconds. Identical frames (same content key) are encoded once.
    """
    if source.cache is None:
        raise ValueError("no feature cache to fill (features.cache is off, or the producers train)")
    producers = model.feature_producers(source.split)
    modes = [m.training for m in producers]
    for m in producers:
        m.eval()
    t0 = time.perf_counter()
    total = len(frames) if limit is None else min(limit, len(frames))
    seen: set[str] = set()
    encoded = cached = 0
    try:
        for start in range(0, total, chunk):
            pixels = frames[torch.arange(start, min(start + chunk, total))]
            keys = frame_keys(pixels)
            rows = []
            for i, key in enumerate(keys):  # first occurrence of each key in the whole pass
                if key not in seen:
                    seen.add(key)
                    rows.append(i)
            hits, _ = source.cache.lookup([keys[i] for i in rows]) if rows else (torch.zeros(0, dtype=torch.bool), None)
            todo = [r for r, hit in zip(rows, hits.tolist()) if not hit]
            cached += len(rows) - len(todo)
            if not todo:
                continue
            sel = pixels[torch.tensor(todo)]
            inputs = model.prepare_frames(sel).to(device)
            feats = model.encode_vision(inputs) if source.split else model.encode_images(inputs)
            source.cache.put([keys[i] for i in todo], feats)
            encoded += len(todo)
    finally:
        for m, mode in zip(producers, modes):
            m.train(mode)
    source.cache.flush()
    out = {"frames": total, "distinct_frames": len(seen), "encoded": encoded, "already_cached": cached,
           "entries": int(source.cache.stats["entries"]), "seconds": round(time.perf_counter() - t0, 2)}
    log.info("feature cache: %s", out)
    return out
