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
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from vlmtrain.features.cache import FeatureCache, cache_enabled, fingerprint_modules
from vlmtrain.features.fingerprint import PROJECTOR, VISION
from vlmtrain.models.parts import trained_parts
from vlmtrain.models.protocol import VLM, FrameBatch
from vlmtrain.models.spatial import spatial_branch, unfused

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
    ``spatial_cache``: the frozen spatial encoder's features of a model with a spatial branch.
    """

    def __init__(self, cache: Optional[FeatureCache] = None, split: bool = False,
                 spatial_cache: Optional[FeatureCache] = None):
        self.cache, self.split, self.spatial_cache = cache, split, spatial_cache
        self.spatial_encoded = 0  # frames the spatial encoder ran on since the last ``pop_spatial_encoded``

    @property
    def uses_cache(self) -> bool:
        """Whether the visual features are read from (and written to) a cache."""
        return self.cache is not None

    @property
    def needs_frame_keys(self) -> bool:
        """Whether batches must carry their frames' content keys (either cache is on)."""
        return self.cache is not None or self.spatial_cache is not None

    def pop_spatial_encoded(self) -> int:
        """Frames the spatial encoder ran on since the last call."""
        n, self.spatial_encoded = self.spatial_encoded, 0
        return n

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
        if self.needs_frame_keys and batch.frame_keys is None:
            raise ValueError("a feature cache is on but the batch has no frame keys (the loader computes "
                             "them: StepBuilder(..., frame_keys=True))")
        todo = None
        if self.cache is not None:
            hits, feats = self.cache.lookup(batch.frame_keys)
            batch.cached = CacheLookup(hits, feats)
            todo = (~hits).nonzero().flatten()
        batch.frames = unfused(model).prepare_frames(batch.pixels if todo is None else batch.pixels[todo])
        branch = spatial_branch(model)
        if branch is not None:
            todo = None
            if self.spatial_cache is not None:
                hits, feats = self.spatial_cache.lookup(batch.frame_keys)
                batch.spatial_cached = CacheLookup(hits, feats)
                todo = (~hits).nonzero().flatten()
            batch.spatial_frames = branch.prepare(batch.pixels if todo is None else batch.pixels[todo])

    # -- inside the step -------------------------------------------------------------------------
    def features(self, model: VLM, batch, device: torch.device) -> tuple[torch.Tensor, int]:
        """Features (F, K, D) for the batch's unique frames, and how many of its frames ran through the
        encoder. A batch without frames gets one black frame's features (1, K, D) and counts 0 frames
        (module docstring); the cache is not involved. ``prepare`` must have run on the batch."""
        if batch.pixels.shape[0] == 0:
            return dummy_frame_features(model, device), 0
        base = unfused(model)
        branch = spatial_branch(model)
        concat = branch is not None and branch.concat  # vision features meet the branch before the projector
        frames: FrameBatch = batch.frames.to(device, non_blocking=True)
        if self.cache is None:
            feats = base.encode_vision(frames) if concat else base.encode_images(frames)
            encoded = int(batch.pixels.shape[0])
        else:
            found: CacheLookup = batch.cached
            encode = base.encode_vision if self.split else base.encode_images
            feats, encoded = _through_cache(
                self.cache, found, batch.frame_keys,
                lambda rows: encode(frames if len(rows) == len(frames.pixels) else frames.select(rows)), device)
        if branch is None:
            return (base.project(feats) if self.split else feats), encoded
        pixels = batch.spatial_frames.to(device, non_blocking=True)
        if self.spatial_cache is None:
            spatial = branch.encode(pixels)
            self.spatial_encoded += int(batch.pixels.shape[0])
        else:
            found = batch.spatial_cached
            spatial, n = _through_cache(
                self.spatial_cache, found, batch.frame_keys,
                lambda rows: branch.encode(pixels if len(rows) == len(pixels) else pixels[rows]), device)
            self.spatial_encoded += n
        if concat:
            return base.project(branch.fuse(feats, spatial)), encoded
        return branch.fuse(base.project(feats) if self.split else feats, spatial), encoded

    def stats(self) -> dict[str, float]:
        """The cache's counters (empty without a cache), the spatial cache's as ``spatial_*``."""
        out = dict(self.cache.stats) if self.cache is not None else {}
        if self.spatial_cache is not None:
            out.update({f"spatial_{k}": v for k, v in self.spatial_cache.stats.items()})
        return out

    def close(self) -> None:
        """Flush and close the caches."""
        for cache in (self.cache, self.spatial_cache):
            if cache is not None:
                cache.close()


def _through_cache(cache: FeatureCache, found: CacheLookup, keys: list[str], encode, device: torch.device
                   ) -> tuple[torch.Tensor, int]:
    """(features of every looked-up frame, frames encoded): the hits from ``found``; the misses looked
    up again first (the batch was prepared ahead, so an earlier step may have stored them since: they
    become hits, in ``found`` too), the rest from ``encode(rows)`` (``rows`` index the encoder inputs,
    which hold the misses in order; frames of equal content are encoded once), run without
    gradients, stored in ``cache`` and rounded through its dtype as stored ones are (module docstring)."""
    misses = (~found.hits).nonzero().flatten()
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows of the batch's frames, their features)
    hit_rows = found.hits.nonzero().flatten()
    if len(hit_rows):
        pieces.append((hit_rows, found.features))
    if len(misses):
        late, late_feats = cache.lookup([keys[i] for i in misses.tolist()], recount=True)
        if bool(late.any()):
            pieces.append((misses[late], late_feats))
        todo = (~late).nonzero().flatten()
        rows = misses[todo]
        todo_keys = [keys[i] for i in rows.tolist()]
        first: dict[str, int] = {}
        for j, k in enumerate(todo_keys):
            first.setdefault(k, j)
        encoded = len(first)
        if len(todo):
            with torch.no_grad():
                fresh = encode(todo[list(first.values())])
            cache.put(list(first), fresh)
            fresh = fresh.detach().to(cache.dtype).float()
            order = {k: i for i, k in enumerate(first)}
            pieces.append((rows, fresh[[order[k] for k in todo_keys]]))
        found.hits[misses[late]] = True
    else:
        encoded = 0
    shape = pieces[0][1].shape[1:]
    out = torch.empty((len(found.hits), *shape), dtype=torch.float32, device=device)
    for rows, feats in pieces:
        out[rows.to(device)] = feats.to(device, non_blocking=True)
    return out, encoded


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
    branch = spatial_branch(model)
    # concat fusion: the projector reads the vision features joined with the branch's, so only the
    # vision features can be cached (even when the projector is frozen)
    split = model.supports_split and (projector_changes or (branch is not None and branch.concat))
    producers = (VISION,) if split else (VISION, PROJECTOR)
    ok, reason = cache_enabled(full, lora, producers)
    return ok, split, reason


def cache_bytes_per_frame(model: VLM, split: bool, store_bytes: int = 2) -> int:
    """Bytes one frame's cached features take (K x D entries of a black frame's features at 2 bytes)."""
    h, w = model.frame_size
    base = unfused(model)
    with torch.no_grad():
        frames = base.prepare_frames(torch.zeros(1, 3, h, w, dtype=torch.uint8))
        feats = base.encode_vision(frames) if split else base.encode_images(frames)
    return int(feats[0].numel()) * store_bytes


def spatial_bytes_per_frame(model: VLM, store_bytes: int = 2) -> int:
    """Bytes one frame's cached spatial features take (visual tokens x spatial width), 0 without a branch."""
    branch = spatial_branch(model)
    return math.prod(branch.grid) * branch.feature_dim * store_bytes if branch is not None else 0


def _free_bytes(root: Path) -> int:
    path = root
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def cache_size_problem(fcfg, model: VLM, split: bool, root: Path, frames: int,
                       per_frame: Optional[int] = None) -> Optional[str]:
    """Why a cache of ``frames`` frames must not be filled (over ``features.max_gib`` or 90 % of the free
    disk space at ``root``), or None. Frames already cached are counted too: an upper bound.
    ``per_frame``: bytes per frame (default: the visual features', ``cache_bytes_per_frame``)."""
    if frames <= 0:
        return None
    need = frames * (per_frame if per_frame is not None else cache_bytes_per_frame(model, split))
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
    refused (``CacheMismatchError``) in both modes. A model with a spatial branch also gets the
    branch's cache (``ROOT/spatial``; its encoder is always frozen, so only the size limit keeps it off).
    """
    if fcfg.cache == "off":
        return FeatureSource()
    ok, split, reason = cache_decision(model)
    root = Path(fcfg.cache_dir) if fcfg.cache_dir else Path(output_dir) / "feature_cache"
    if ok:
        too_big = cache_size_problem(fcfg, model, split, root, frames)
        if too_big is not None:
            ok, reason = False, f"feature cache off: {too_big}"
    spatial = _spatial_cache(fcfg, model, root / SPATIAL_CACHE_DIR, frames)
    if not ok:
        if fcfg.cache == "on":
            raise FeatureCacheUnavailable(f"features.cache=on, but {reason}")
        log.info(reason)
        return FeatureSource(spatial_cache=spatial)
    producers = model.feature_producers(split)
    preprocess = dict(model.feature_preprocess(), producer="vision" if split else "vision+projector")
    cache = FeatureCache(root, fingerprint_modules(*producers), preprocess, dtype=fcfg.dtype)
    log.info("%s; %s features in %s (%d entries)", reason, preprocess["producer"], root, cache.stats["entries"])
    return FeatureSource(cache, split, spatial_cache=spatial)


SPATIAL_CACHE_DIR = "spatial"  # the spatial branch's cache, under the feature cache root


def _spatial_cache(fcfg, model: VLM, root: Path, frames: int) -> Optional[FeatureCache]:
    branch = spatial_branch(model)
    if branch is None:
        return None
    too_big = cache_size_problem(fcfg, model, False, root, frames, per_frame=spatial_bytes_per_frame(model))
    if too_big is not None:
        if fcfg.cache == "on":
            raise FeatureCacheUnavailable(f"features.cache=on, but the spatial {too_big}")
        log.info("spatial feature cache off: %s", too_big)
        return None
    cache = FeatureCache(root, fingerprint_modules(branch.encoder), branch.identity(), dtype=fcfg.dtype)
    log.info("spatial encoder features in %s (%d entries)", root, cache.stats["entries"])
    return cache
