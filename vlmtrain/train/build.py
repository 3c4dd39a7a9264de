"""Builders of a run, from its config: model and data, feature source, parallel wrapper and optimizer,
the data path (step plan -> batch builder -> prefetcher) and the FLOPs model.

``train``, ``vlmtrain bench``, ``vlmtrain cache`` and ``vlmtrain export`` all build through here, so
they measure, cache and export exactly what training runs. Configs stop here: everything below
receives plain values.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from vlmtrain.config import ConfigError, FeaturesConfig, ParallelConfig, RunConfig
from vlmtrain.data.dataset import TrainData, conversations_of, load_data, open_indexes, read_sources
from vlmtrain.data.errors import ErrorPolicy
from vlmtrain.data.index import default_index_root
from vlmtrain.data.loader import StepBuilder
from vlmtrain.data.sampler import make_plan
from vlmtrain.envs.gridnav.expert import EXPERT_VERSION
from vlmtrain.envs.gridnav.generate import expert_version, write_dataset
from vlmtrain.features.source import FeatureSource
from vlmtrain.metrics.flops import ModelFlops, model_flops, peak_flops
from vlmtrain.models.lora import LoraSettings, apply_lora, format_trainable
from vlmtrain.models.packed_attention import enable_varlen_attention, uses_varlen
from vlmtrain.models.parts import trained_parts
from vlmtrain.models.protocol import VLM
from vlmtrain.models.registry import build_model as build_family_model
from vlmtrain.models.registry import build_tokenizer
from vlmtrain.models.spatial import attach_spatial, settings_from_config
from vlmtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from vlmtrain.parallel.deepspeed_engine import DeepSpeedEngine, deepspeed_config_from
from vlmtrain.parallel.init import DistInfo, get_logger, is_main, main_first, on_main, rank_and_world
from vlmtrain.parallel.parallelize import parallelize
from vlmtrain.train.optim import apply_freeze, build_optimizer, build_scheduler
from vlmtrain.train.prefetch import BatchPrefetcher
from vlmtrain.train.step import prepare_batch

log = logging.getLogger("vlmtrain")
TOKENIZER_DIR = "tokenizer"  # output_dir/tokenizer: the run's tokenizer (the composed model's is trained here)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ensure_gridnav(dcfg) -> None:
    """Generate the GridNav training set into ``data.root`` when asked (``gridnav_episodes > 0``) and
    absent, or again when it was generated with another version of the expert's labels."""
    root = Path(dcfg.root)
    if dcfg.gridnav_episodes <= 0:
        return
    if (root / "meta" / "info.json").exists():
        found = expert_version(root)
        if found is None or found == EXPERT_VERSION:
            return
        log.warning("%s was generated with GridNav expert version %d (now %d): generating it again",
                    root, found, EXPERT_VERSION)
    log.info("generating %d GridNav episodes into %s", dcfg.gridnav_episodes, root)
    write_dataset(root, episodes=dcfg.gridnav_episodes, seed=dcfg.gridnav_seed, split="train",
                  noise_p=dcfg.gridnav_noise, detour_p=dcfg.gridnav_detour, setting=dcfg.setting,
                  overwrite=True)


def lora_settings(mcfg) -> LoraSettings:
    """``model.lora_*`` as LoRA settings (an empty target list means the default targets)."""
    return LoraSettings(rank=mcfg.lora_rank, alpha=mcfg.lora_alpha, dropout=mcfg.lora_dropout,
                        target_modules=tuple(mcfg.lora_targets) or None, parts=tuple(mcfg.lora_parts))


def build_model(cfg: RunConfig, tokenizer=None) -> VLM:
    """The model ready to train: built for ``model.family`` (``models/registry.py``; the composed model
    around ``tokenizer``), then freezing, LoRA, activation checkpointing and per-document attention.

    With LoRA, the parts in ``model.lora_parts`` are frozen first, so they train only through their
    LoRA weights (not through full-rank embeddings and norms as well); other parts follow the
    ``train.freeze_*`` flags.
    """
    model = build_family_model(cfg.model, cfg.data.image_size, cfg.data.num_history + 1, tokenizer)
    return prepare_for_training(model, cfg)


def prepare_for_training(model: VLM, cfg: RunConfig) -> VLM:
    """What ``build_model`` does after the family's builder (also to a weightless model, ``vlmtrain
    plan``): freezing, LoRA, activation checkpointing and per-document attention, then the spatial
    branch of ``model.spatial_encoder`` (``models/spatial.py``; weightless on a weightless model)."""
    m = cfg.model
    apply_freeze(model, cfg.train, also_frozen=m.lora_parts if m.lora else ())
    if m.lora:
        log.info("LoRA: %s", format_trainable(apply_lora(model, lora_settings(m))))
    apply_activation_checkpointing(model, cfg.train.grad_checkpointing)
    if cfg.data.packing and cfg.data.packed_attention == "varlen":
        enable_varlen_attention(model)
    return attach_spatial(model, settings_from_config(m))  # last: LoRA and checkpointing stay the base's


def _conversations(cfg: RunConfig) -> Iterator[list]:
    """Every sample's turns, read only when iterated (the composed model's tokenizer trains on them;
    defects are skipped here and reported by the index with the run's policy)."""
    yield from conversations_of(read_sources(cfg.data, ErrorPolicy("skip"), cfg.seed))


def run_tokenizer(cfg: RunConfig, out: Path, resumed: bool) -> Any:
    """The tokenizer the run's model is built around (None when the model brings its own): rank 0
    builds it (a composed model's is trained on the data, or reloaded on resume) and saves it to
    ``output_dir/tokenizer``; the other ranks then load that one, so every rank has the same
    vocabulary and model."""
    with main_first():
        saved = out / TOKENIZER_DIR if resumed or not is_main() else None
        tokenizer = build_tokenizer(cfg.model, _conversations(cfg), saved)
        if tokenizer is not None:
            on_main(tokenizer.save_pretrained, str(out / TOKENIZER_DIR))
    return tokenizer


def build_model_and_data(cfg: RunConfig, out: Path, resumed: bool = False) -> tuple[VLM, TrainData]:
    """The run's model and data, one path for every family: GridNav generated first when asked, the
    model built (around the run's tokenizer when it has one), then every source's sample index
    opened (built once per node, by its first rank, when missing) and mixed for the run."""
    ensure_gridnav(cfg.data)
    model = build_model(cfg, run_tokenizer(cfg, out, resumed))
    with main_first(local=True):
        indexes = open_indexes(cfg.data, model, default_index_root(cfg.data.index_dir))
    return model, load_data(cfg.data, model, cfg.seed, indexes, ErrorPolicy(cfg.data.on_error))


def build_val_data(cfg: RunConfig, model: VLM) -> Optional[TrainData]:
    """The held-out samples of the run (None without ``data.val_fraction`` / ``data.val_sources``):
    the episodes ``data.val_fraction`` holds out of the training sources, or the ``data.val_sources``
    mixed like training sources (their percents apply), indexed like the training data and decoded
    once at start-up."""
    d = cfg.data
    if d.val_sources:
        vcfg, split = dataclasses.replace(d, sources=list(d.val_sources), val_fraction=0.0, workers=0), "train"
    elif d.val_fraction > 0:
        vcfg, split = dataclasses.replace(d, workers=0), "val"
    else:
        return None
    with main_first(local=True):
        indexes = open_indexes(vcfg, model, default_index_root(vcfg.index_dir))
    return load_data(vcfg, model, cfg.seed, indexes, ErrorPolicy(d.on_error), split=split)


def build_plan(cfg: RunConfig, data: TrainData, model: VLM, cached: bool, packing: Optional[bool] = None,
               world_rank: Optional[tuple[int, int]] = None):
    """This rank's step plan (``data/sampler.py``); ``packing`` overrides ``data.packing`` (the naive
    baseline of ``vlmtrain bench``). ``cached``: features come from a cache. ``world_rank``: plan as
    that rank of that many (``vlmtrain plan``) instead of this process's. A packed plan's first
    epoch is kept next to the sample indexes (``plans/``), so a warm start reads it instead of
    planning it again."""
    world, rank = world_rank if world_rank is not None else rank_and_world()[::-1]
    dcfg = cfg.data if packing is None else dataclasses.replace(cfg.data, packing=packing)
    return make_plan(dcfg, cfg.train, data.samples, model.vision_patches_per_frame(), cfg.seed, world, rank,
                     cached, one_row=uses_varlen(model), cache_dir=default_index_root(dcfg.index_dir) / "plans")


def resolve_steps(cfg: RunConfig, plan, world_size: int = 1) -> RunConfig:
    """``cfg`` with the run's length resolved, so every rank and every later builder sees one count:
    ``train.steps`` = ceil(``train.epochs`` x the plan's steps per epoch) when epochs > 0, and
    ``optim.warmup_steps`` = ceil(``optim.warmup_ratio`` x steps) when the ratio is > 0. Logs the
    resolved steps, steps per epoch, warmup and global batch at start."""
    train, optim = cfg.train, cfg.optim
    if train.epochs > 0:
        train = dataclasses.replace(train, steps=max(1, math.ceil(train.epochs * plan.steps_per_epoch)))
    if optim.warmup_ratio > 0:
        optim = dataclasses.replace(optim, warmup_steps=math.ceil(optim.warmup_ratio * train.steps))
    log.info("run length: %d steps (%.3g epochs, %d steps per epoch), warmup %d steps, global batch %d samples "
             "(%d micro-batches x %d ranks)", train.steps, train.steps / plan.steps_per_epoch, plan.steps_per_epoch,
             optim.warmup_steps, train.batch_size, train.grad_accum, world_size)
    return dataclasses.replace(cfg, train=train, optim=optim)


def rank_features(fcfg: FeaturesConfig, pcfg: ParallelConfig, info: DistInfo, out: Path) -> FeaturesConfig:
    """``features.*`` for this rank: a feature cache has one writer, so each rank of a multi-process
    run keeps its own (``<cache_dir>/rank-<r>``). Under DeepSpeed ZeRO-3 there is no cache (``auto``
    says why in the log, ``on`` is an error): ZeRO-3 gathers the vision tower's weights in its
    forward on every rank at once, and a rank whose frames all hit its cache would skip it."""
    if fcfg.cache == "off":
        return fcfg
    if pcfg.backend == "deepspeed" and pcfg.deepspeed_zero_stage == 3:
        why = ("DeepSpeed ZeRO-3 gathers the vision tower's partitioned weights in its forward on every rank "
               "together, and ranks could disagree on whether the tower runs (all frames cache hits on one)")
        if fcfg.cache == "on":
            raise ConfigError(f"features.cache=on cannot be used with parallel.deepspeed_zero_stage=3: {why}")
        get_logger().info("feature cache off: %s", why)
        return dataclasses.replace(fcfg, cache="off")
    if info.world_size == 1:
        return fcfg
    root = Path(fcfg.cache_dir) if fcfg.cache_dir else out / "feature_cache"
    return dataclasses.replace(fcfg, cache_dir=str(root / f"rank-{info.rank}"))


def parallel_and_optimizer(model: VLM, cfg: RunConfig, info: DistInfo, out: Path, cached_features: bool
                           ) -> tuple[Union[nn.Module, DeepSpeedEngine], torch.optim.Optimizer, Any]:
    """(``model`` wrapped for ``parallel.backend``, optimizer, scheduler), built in the order the backend
    needs (``parallel/parallelize.py``).

    FSDP2 replaces the parameters by shards, so its optimizer is built after wrapping; a DeepSpeed
    engine takes the optimizer and scheduler in, so they come first (its compiled ops go to
    ``output_dir/torch_extensions`` unless ``TORCH_EXTENSIONS_DIR`` is set)."""
    pcfg, precision = cfg.parallel, cfg.train.precision
    if pcfg.backend != "deepspeed":
        parallel = parallelize(model, pcfg, info, precision=precision, cached_features=cached_features)
        optimizer = build_optimizer(model, cfg.optim)  # after parallelize: FSDP2 replaced the parameters by shards
        return parallel, optimizer, build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    micro = max(1, cfg.train.batch_size // (cfg.train.grad_accum * info.world_size))
    ds = deepspeed_config_from(pcfg, bf16=precision == "bf16", grad_accum=cfg.train.grad_accum,
                               grad_clip=cfg.optim.grad_clip, micro_batch_size=micro)
    engine = parallelize(model, pcfg, info, precision=precision, cached_features=cached_features,
                         optimizer=optimizer, scheduler=scheduler, deepspeed=ds,
                         extensions_dir=str(out / "torch_extensions"))
    return engine, optimizer, scheduler


def build_batches(cfg: RunConfig, data: TrainData, model: VLM, source: FeatureSource, start: int, end: int,
                  dedup: bool = True, packing: Optional[bool] = None, plan=None):
    """(prefetcher of plan steps ``start .. end-1``, the plan: ``plan``, or ``build_plan``'s).
    ``dedup=False`` / ``packing=False`` build the naive baseline of ``vlmtrain bench --compare naive``.
    Batches come with their frames' content keys when a feature cache is on, and are prepared
    (``step.prepare_batch``) on the loader thread."""
    plan = plan if plan is not None else build_plan(cfg, data, model, source.uses_cache, packing)
    build = StepBuilder(data.samples, data.frames, data.pad_id, data.image_id, plan, dedup=dedup,
                        frame_keys=source.needs_frame_keys)
    batches = BatchPrefetcher(build, start, end, workers=cfg.data.workers,
                              prepare=lambda b: prepare_batch(model, b, source),
                              prefetch_factor=cfg.data.prefetch_factor,
                              persistent_workers=cfg.data.persistent_workers and cfg.data.workers > 0)
    return batches, plan


def run_flops(model: VLM, source: FeatureSource) -> Optional[ModelFlops]:
    """The model's FLOPs model as it trains (None when its architecture has no shape rule)."""
    trained, lora = trained_parts(model)
    try:
        return model_flops(model, trained, lora, cached=source.uses_cache, split=source.split)
    except (ValueError, AttributeError):
        return None


def device_peak(device: torch.device, precision: str) -> Optional[float]:
    """Dense peak FLOP/s of the training device at the run's precision (None on CPU / unknown GPUs)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), "bf16" if precision == "bf16" else "fp32")
