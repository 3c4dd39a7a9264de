"""The data path of a run, wired from the config: step plan -> batch builder -> prefetcher; plus the
run's FLOPs model. Shared by ``train`` and ``vlmtrain bench`` so both measure the same thing."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from vlmtrain.data.loader import StepBuilder
from vlmtrain.data.sampler import make_plan
from vlmtrain.features.cache import frame_keys
from vlmtrain.features.source import FeatureSource, trained_parts
from vlmtrain.metrics.flops import ModelFlops, model_flops, peak_flops
from vlmtrain.train.optim import part_of
from vlmtrain.train.prefetch import BatchPrefetcher
from vlmtrain.train.step import prepare_batch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: from the process group when one exists, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_batches(cfg, data, model: nn.Module, source: FeatureSource, start: int, end: int,
                  dedup: bool = True, packing: Optional[bool] = None):
    """(prefetcher of plan steps ``start .. end-1``, the plan). ``dedup=False`` / ``packing=False``
    build the naive baseline of ``vlmtrain bench --compare naive``."""
    rank, world = rank_and_world()
    dcfg = cfg.data if packing is None else dataclasses.replace(cfg.data, packing=packing)
    plan = make_plan(dcfg, cfg.train, data.samples, model.vision_patches_per_frame(), cfg.seed, world, rank)
    preloaded = isinstance(data.frames, torch.Tensor)
    keys = frame_keys(data.frames) if source.uses_cache and preloaded and dedup else None
    build = StepBuilder(data.samples, data.frames, data.tokenizer.pad_token_id, data.sample_tokenizer.image_id, plan,
                        dedup=dedup, keys=keys, hash_frames=source.uses_cache and keys is None)
    batches = BatchPrefetcher(build, start, end, workers=cfg.data.workers,
                              prepare=lambda b: prepare_batch(model, b, source))
    return batches, plan


def run_flops(model: nn.Module, source: FeatureSource) -> Optional[ModelFlops]:
    """The model's FLOPs model as it trains (None when its architecture has no shape rule)."""
    trained, lora = trained_parts(model)
    try:
        return model_flops(model, part_of, trained, lora, cached=source.uses_cache, split=source.split)
    except (ValueError, AttributeError):
        return None


def device_peak(device: torch.device, precision: str) -> Optional[float]:
    """Dense peak FLOP/s of the training device at the run's precision (None on CPU / unknown GPUs)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), "bf16" if precision == "bf16" else "fp32")
