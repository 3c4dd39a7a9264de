"""Where a step's image features come from: the encoder on every unique frame, or the feature cache.

:class:`FeatureSource` is built once per run (``open_feature_source``) and used in two places:

- ``prepare(batch)`` on the loader thread, one step ahead: looks the batch's frames up in the cache
  (their content keys come with the batch, computed by the loader) and runs the model's
  ``prepare_frames`` on the frames the step will really encode (all of them without a cache, the
  misses with one);
- ``features(model, batch, device)`` inside the step: encodes what ``prepare`` left, stores fresh
  features in the cache (the cache fills online), and — when the cache holds vision-encoder features
  of a split model — runs the (trainable) projector on all of them.

Fresh features are rounded through the cache's store dtype exactly as stored ones are, so a frame's
features do not depend on whether it hit or missed (a warm and a cold run train identically).

**A batch without frames** (text-only samples) gets the features of one black frame
(:func:`dummy_frame_features`); its slot list is empty, so none of them reach the LM and the loss is
that of the text alone. The vision tower thus runs in every micro-batch, the autograd graph has the
same shape as with frames, and every trainable image parameter gets a (zero) gradient. That is what
data parallelism needs (DDP waits for a gradient of every parameter; FSDP2 and ZeRO-3 gather each
module's weights in its forward, in the same order on every rank; ZeRO-2/3 reduce gradients in
buckets filled in the order they become ready), and one process then updates the same parameters as N
ranks would. Encoding zero frames instead would crash some towers (SigLIP's patch embedding).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from vlmtrain.features.cache import FeatureCache, cache_enabled, fingerprint_modules
from vlmtrain.features.fingerprint import PROJECTOR, VISION
from vlmtrain.models.parts import trained_parts
from vlmtrain.models.protocol import VLM, FrameBatch

log = logging.getLogger("vlmtrain")


class FeatureCacheUnavailable(ValueError):
    """``features.cache=on`` but the run trains a part whose features would be cached."""


@dataclass
class CacheLookup:
    """What the loader found in the cache for one batch's unique frames."""

    hits: torch.Tensor  # (F,) bool
    features: torch.Tensor  # (hits, ...) float32, CPU


class FeatureSource:
    """Encodes a batch's frames, through the feature cache when there is one (see the module docstring).

    ``cache=None``: every unique frame of the step runs through ``encode_images``. ``split``: the cache
    holds vision-encoder features (``model.encode_vision``) and ``model.project`` runs every step.
    """

    def __init__(self, cache: Optional[FeatureCache] = None, split: bool = False):
        self.cache, self.split = cache, split

    @property
    def uses_cache(self) -> bool:
        """Whether features are read from (and written to) a cache."""
        return self.cache is not None

    def settle(self, model: VLM) -> None:
        """Put the cached producers in eval mode (dropout would make stored features random); call
        after ``model.train()``."""
        if self.cache is not None:
            for module in model.feature_producers(self.split):
                module.eval()

    # -- loader thread ---------------------------------------------------------------------------
    def prepare(self, model: VLM, batch) -> None:
        """Cache lookup (``batch.cached``) and the model's preprocessing of the frames to encode
        (``batch.frames``); nothing for a batch without frames (``features`` encodes a black frame)."""
        if batch.pixels.shape[0] == 0:
            return
        todo = None
        if self.cache is not None:
            if batch.frame_keys is None:
                raise ValueError("a feature cache is on but the batch has no frame keys (the loader computes "
                                 "them: StepBuilder(..., frame_keys=True))")
            hits, feats = self.cache.lookup(batch.frame_keys)
            batch.cached = CacheLookup(hits, feats)
            todo = (~hits).nonzero().flatten()
        batch.frames = model.prepare_frames(batch.pixels if todo is None else batch.pixels[todo])

    # -- inside the step -------------------------------------------------------------------------
    def features(self, model: VLM, batch, device: torch.device) -> tuple[torch.Tensor, int]:
        """Features (F, K, D) for the batch's unique frames, and how many of its frames ran through the
        encoder. A batch without frames gets one black frame's features (1, K, D) and counts 0 frames
        (module docstring); the cache is not involved. ``prepare`` must have run on the batch."""
        if batch.pixels.shape[0] == 0:
            return dummy_frame_features(model, device), 0
        frames: FrameBatch = batch.frames.to(device, non_blocking=True)
        if self.cache is None:
            return model.encode_images(frames), int(batch.pixels.shape[0])
        found: CacheLookup = batch.cached
        misses = (~found.hits).nonzero().flatten()
        out = None
        if len(misses):
            with torch.no_grad():
                fresh = model.encode_vision(frames) if self.split else model.encode_images(frames)
            self.cache.put([batch.frame_keys[i] for i in misses.tolist()], fresh)
            fresh = fresh.detach().to(self.cache.dtype).float()
            out = fresh.new_empty((len(found.hits), *fresh.shape[1:]))
            out[misses.to(device)] = fresh
        hit_rows = found.hits.nonzero().flatten()
        if len(hit_rows):
            hit_feats = found.features.to(device, non_blocking=True)
            if out is None:
                out = hit_feats.new_empty((len(found.hits), *hit_feats.shape[1:]))
            out[hit_rows.to(device)] = hit_feats
        return (model.project(out) if self.split else out), len(misses)

    def stats(self) -> dict[str, float]:
        """The cache's counters (empty without a cache)."""
        return self.cache.stats if self.cache is not None else {}

    def close(self) -> None:
        """Flush and close the cache."""
        if self.cache is not None:
            self.cache.close()


def dummy_frame_features(model: VLM, device: torch.device) -> torch.Tensor:
    """Visual tokens (1, K, D) of one black frame, through the model's own preprocessing and encoder:
    the features of a batch without frames (module docstring). Pass them to ``embed`` with the batch's
    empty slot list: ``embed(ids, dummy_frame_features(model, dev), slots)``."""
    h, w = model.frame_size
    return model.encode_images(model.prepare_frames(torch.zeros(1, 3, h, w, dtype=torch.uint8)).to(device))


def cache_decision(model: VLM) -> tuple[bool, bool, str]:
    """(cache usable, split, reason line): what a cache may hold for this model as it trains.

    The producers are the vision tower and the projector; a model that splits them
    (``supports_split``) may cache vision features while only the projector trains.
    """
    full, lora = trained_parts(model)
    projector_changes = PROJECTOR in full or PROJECTOR in lora
    split = model.supports_split and projector_changes
    producers = (VISION,) if split else (VISION, PROJECTOR)
    ok, reason = cache_enabled(full, lora, producers)
    return ok, split, reason


def cache_bytes_per_frame(model: VLM, split: bool, store_bytes: int = 2) -> int:
    """Bytes one frame's cached features take (K x D entries of a black frame's features at 2 bytes)."""
    h, w = model.frame_size
    with torch.no_grad():
        frames = model.prepare_frames(torch.zeros(1, 3, h, w, dtype=torch.uint8))
        feats = model.encode_vision(frames) if split else model.encode_images(frames)
    return int(feats[0].numel()) * store_bytes


def _free_bytes(root: Path) -> int:
    path = root
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def cache_size_problem(fcfg, model: VLM, split: bool, root: Path, frames: int) -> Optional[str]:
    """Why a cache of ``frames`` frames must not be filled (over ``features.max_gib`` or 90 % of the free
    disk space at ``root``), or None. Frames already cached are counted too: an upper bound."""
    if frames <= 0:
        return None
    need = frames * cache_bytes_per_frame(model, split)
    free = _free_bytes(root)
    limit = min(fcfg.max_gib * 2 ** 30, 0.9 * free)
    if need <= limit:
        return None
    return (f"a feature cache of {frames} frames needs {need / 2 ** 30:.1f} GiB, over the limit of "
            f"{limit / 2 ** 30:.1f} GiB (features.max_gib={fcfg.max_gib:g}, {free / 2 ** 30:.1f} GiB free at {root})")


def open_feature_source(fcfg, model: VLM, output_dir: str | Path, frames: int = 0) -> FeatureSource:
    """The run's feature source from ``features.*`` (a builder: the config stops here).

    ``off``: no cache. ``auto``: a cache when the producers are frozen and the ``frames`` distinct frames
    of the run fit the size limit (``cache_size_problem``), else a log line saying why not. ``on``: as
    auto, but either reason is an error. A cache directory built by other weights or preprocessing is
    refused (``CacheMismatchError``) in both modes.
    """
    if fcfg.cache == "off":
        return FeatureSource()
    ok, split, reason = cache_decision(model)
    root = Path(fcfg.cache_dir) if fcfg.cache_dir else Path(output_dir) / "feature_cache"
    if ok:
        too_big = cache_size_problem(fcfg, model, split, root, frames)
        if too_big is not None:
            ok, reason = False, f"feature cache off: {too_big}"
    if not ok:
        if fcfg.cache == "on":
            raise FeatureCacheUnavailable(f"features.cache=on, but {reason}")
        log.info(reason)
        return FeatureSource()
    producers = model.feature_producers(split)
    preprocess = dict(model.feature_preprocess(), producer="vision" if split else "vision+projector")
    cache = FeatureCache(root, fingerprint_modules(*producers), preprocess, dtype=fcfg.dtype)
    log.info("%s; %s features in %s (%d entries)", reason, preprocess["producer"], root, cache.stats["entries"])
    return FeatureSource(cache, split)
