"""``train(cfg)``: the whole run, top to bottom."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from vlmtrain.config import ConfigError, FeaturesConfig, ParallelConfig, RunConfig, save_config
from vlmtrain.data.conv_data import ConvData, load_conv_data
from vlmtrain.data.tokenizer import load_tokenizer, save_tokenizer
from vlmtrain.data.vln import VLNData, load_vln_data
from vlmtrain.dist.checkpointing import apply_activation_checkpointing
from vlmtrain.dist.init import (
    DistInfo, all_reduce_max, all_reduce_values, get_logger, init_distributed, is_main, main_first, on_main,
)
from vlmtrain.dist.memory import SyncedEmptyCache, configure_allocator, memory_stats, rank_metrics
from vlmtrain.dist.parallelize import DeepSpeedEngine, deepspeed_config, parallelize
from vlmtrain.dist.run_checkpoint import (
    latest_run_checkpoint, load_run_checkpoint, model_for_saving, save_run_checkpoint,
)
from vlmtrain.metrics.meter import StepMeter
from vlmtrain.metrics.progress import Progress
from vlmtrain.features.source import open_feature_source
from vlmtrain.metrics.sinks import JsonlSink, NullSink
from vlmtrain.models.composed import build_composed_vlm
from vlmtrain.models.export import export_merged
from vlmtrain.models.hf_base import HFVLMAdapter
from vlmtrain.models.lora import LoraSettings, apply_lora, format_trainable
from vlmtrain.models.packed_attention import enable_varlen_attention
from vlmtrain.models.registry import load_adapter
from vlmtrain.train.optim import apply_freeze, build_optimizer, build_scheduler, trainable_counts
from vlmtrain.train.pipeline import build_batches, device_peak, run_flops
from vlmtrain.train.step import train_step

log = logging.getLogger("vlmtrain")
RANK_SEED_STRIDE = 1_000_003  # rank r of a multi-process run draws from seed + stride * (r + 1) after the model is built


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_tokens(cfg: RunConfig) -> tuple[int, int]:
    """Visual tokens of the current frame (after pixel shuffle) and of a (pooled) history frame."""
    k = (cfg.data.image_size // cfg.model.patch_size // cfg.model.pixel_shuffle) ** 2
    kh = cfg.model.history_tokens
    return k, (kh if 0 < kh < k else k)


def lora_settings(mcfg) -> LoraSettings:
    """``model.lora_*`` as LoRA settings (an empty target list means the default targets)."""
    return LoraSettings(rank=mcfg.lora_rank, alpha=mcfg.lora_alpha, dropout=mcfg.lora_dropout,
                        target_modules=tuple(mcfg.lora_targets) or None, parts=tuple(mcfg.lora_parts))


def build_model(cfg: RunConfig, data: Optional[VLNData] = None) -> nn.Module:
    """The model ready to train: the composed VLM sized to the data's tokenizer, or the HF VLM in
    ``model.path`` behind its adapter; then freezing, LoRA (HF families) and activation checkpointing.

    With LoRA, the parts in ``model.lora_parts`` are frozen first, so they train only through their
    LoRA weights (not through full-rank embeddings and norms as well); other parts follow the
    ``train.freeze_*`` flags. ``data`` is needed for the composed model only.
    """
    m = cfg.model
    if m.family == "composed":
        if data is None:
            raise ValueError("the composed model is sized to its data's tokenizer: pass the data")
        tok = data.tokenizer
        model = build_composed_vlm(m, cfg.data.image_size, len(tok), tok.convert_tokens_to_ids("<image>"),
                                   tok.pad_token_id, max_frame_slots=cfg.data.num_history + 1)
        apply_freeze(model, cfg.train)
    else:
        model = load_adapter(m.family, m.path, m.frame_size or None)
        apply_freeze(model, cfg.train, also_frozen=m.lora_parts if m.lora else ())
        if m.lora:
            log.info("LoRA: %s", format_trainable(apply_lora(model, lora_settings(m))))
    apply_activation_checkpointing(model, cfg.train.grad_checkpointing)
    if cfg.data.packing and cfg.data.packed_attention == "varlen":
        enable_varlen_attention(model)
    return model


def build_model_and_data(cfg: RunConfig, out: Path, resumed: bool) -> tuple[nn.Module, Union[VLNData, ConvData]]:
    """Model and data in the order each kind needs: the composed model's tokenizer is trained on the
    data (a resumed run reuses the saved one), so its data come first; an HF model's tokenizer, chat
    format and frame size shape the data, so it comes first."""
    if cfg.model.family == "composed":
        # Rank 0 trains (or reloads) the tokenizer and saves it; the other ranks then load that one,
        # so every rank builds the same vocabulary and model.
        with main_first():
            tok = load_tokenizer(out / "tokenizer") if resumed or not is_main() else None
            data = load_vln_data(cfg.data, image_tokens(cfg), cfg.model.vocab_size, tokenizer=tok)
            on_main(save_tokenizer, data.tokenizer, out / "tokenizer")
        return build_model(cfg, data), data
    model = build_model(cfg)
    return model, load_conv_data(cfg.data, model, cfg.seed)


def save_final_model(model: nn.Module, directory: Path) -> None:
    """``output_dir/model``: the composed model's own format, or for an HF model a plain HF checkpoint
    with LoRA merged (loadable with ``AutoModelForImageTextToText.from_pretrained``)."""
    if isinstance(model, HFVLMAdapter):
        export_merged(model, directory, overwrite=True)
    else:
        model.save_pretrained(directory)


def deepspeed_settings(cfg: RunConfig, world_size: int) -> dict:
    """DeepSpeed's config dict from ``parallel.deepspeed_*`` and the run's batch, clipping and precision
    (``train.precision=bf16``: bf16 parameters, fp32 master weights in the optimizer's partitions)."""
    p = cfg.parallel
    return deepspeed_config(
        stage=p.deepspeed_zero_stage, offload_optimizer=p.deepspeed_offload_optimizer,
        offload_param=p.deepspeed_offload_param, reduce_bucket_size=p.deepspeed_reduce_bucket_size,
        allgather_bucket_size=p.deepspeed_allgather_bucket_size,
        stage3_prefetch_bucket_size=p.deepspeed_stage3_prefetch_bucket_size,
        stage3_param_persistence_threshold=p.deepspeed_stage3_param_persistence_threshold,
        overlap_comm=p.deepspeed_overlap_comm, wall_clock_breakdown=p.deepspeed_wall_clock_breakdown,
        bf16=cfg.train.precision == "bf16", grad_accum=cfg.train.grad_accum, grad_clip=cfg.optim.grad_clip,
        micro_batch_size=max(1, cfg.train.batch_size // (cfg.train.grad_accum * world_size)))


def parallel_and_optimizer(model: nn.Module, cfg: RunConfig, info: DistInfo, out: Path, cached_features: bool
                           ) -> tuple[Union[nn.Module, DeepSpeedEngine], torch.optim.Optimizer, Any]:
    """(``model`` wrapped for ``parallel.backend``, optimizer, scheduler), built in the order the backend
    needs (``dist.parallelize``; the config stops here).

    FSDP2 replaces the parameters by shards, so its optimizer is built after wrapping; a DeepSpeed
    engine takes the optimizer and scheduler in, so they come first (its compiled ops go to
    ``output_dir/torch_extensions`` unless ``TORCH_EXTENSIONS_DIR`` is set).
    ``fsdp_mixed_precision=auto`` is bf16 on CUDA, fp32 on CPU (CPU bf16 is slow and inexact). With a
    feature cache the vision blocks are not sharded on their own: a rank whose frames all hit the
    cache skips the encoder, and its per-block all-gathers would pair with another rank's LM blocks;
    in the root group they are gathered with the root, on every rank."""
    pcfg = cfg.parallel
    if pcfg.backend == "deepspeed":
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        engine = parallelize(model, "deepspeed", info, mixed_precision=cfg.train.precision, optimizer=optimizer,
                             deepspeed=deepspeed_settings(cfg, info.world_size), scheduler=scheduler,
                             extensions_dir=str(out / "torch_extensions"))
        return engine, optimizer, scheduler
    precision = pcfg.fsdp_mixed_precision
    if precision == "auto":
        precision = "bf16" if info.device.type == "cuda" else "fp32"
    parts = [p for p in pcfg.fsdp_shard_parts if not (cached_features and p == "vision")]
    unreachable = getattr(model, "unreachable_trainable", lambda: [])()
    find_unused = pcfg.ddp_find_unused or (pcfg.backend == "ddp" and bool(unreachable))
    if find_unused and not pcfg.ddp_find_unused:
        log.info("ddp: find_unused_parameters on: %d trainable parameters can never get a gradient (e.g. %s)",
                 len(unreachable), unreachable[0])
    parallel = parallelize(model, pcfg.backend, info, mixed_precision=precision, find_unused=find_unused,
                           bucket_cap_mb=pcfg.ddp_bucket_cap_mb, reshard_after_forward=pcfg.fsdp_reshard_after_forward,
                           shard_parts=parts, reduce_dtype=pcfg.fsdp_reduce_dtype)
    optimizer = build_optimizer(model, cfg.optim)  # after parallelize: FSDP2 replaced the parameters by shards
    return parallel, optimizer, build_scheduler(optimizer, cfg.optim, cfg.train.steps)


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


def main_sink(path: Path, start: int, enabled: bool = True):
    """A JSONL sink on rank 0 (a resumed run drops the lines after ``start`` and rewrites them); a null
    sink on the other ranks or when not ``enabled``."""
    return (on_main(JsonlSink, path, truncate_after_step=start) if enabled else None) or NullSink()


def log_metrics(meter: StepMeter, epoch: float, info: DistInfo, empty_cache: SyncedEmptyCache) -> dict:
    """The window's metrics; a multi-process run adds each rank's step time, data wait and (CUDA)
    memory peaks as max/min over ranks, one process its memory peaks (collective: every rank calls it)."""
    spread = rank_metrics(meter.window_times(), info.device) if info.world_size > 1 else memory_stats(info.device)
    return {**meter.flush(epoch=epoch), **{k: round(v, 6) for k, v in spread.items()}, **empty_cache.metrics()}


def add_totals(previous: dict, meter: StepMeter) -> dict:
    """The run's totals for checkpoints and the summary: samples and tokens of every rank, wall time
    of the slowest rank (collective)."""
    window = meter.pop_totals({})
    samples, tokens = all_reduce_values([window["samples"], window["tokens"]], "sum")
    return {"wall_s": previous["wall_s"] + all_reduce_max(window["wall_s"]),
            "samples": previous["samples"] + int(samples), "tokens": previous["tokens"] + int(tokens)}


def start_process(cfg: RunConfig) -> DistInfo:
    """This process's part of the job: the CUDA allocator setting (before CUDA starts), the process
    group when ``torchrun`` started it (gloo on CPU, nccl on CUDA), torch threads. DeepSpeed needs
    the process group even for one process (``torchrun --nproc_per_node 1``)."""
    if cfg.memory.alloc_conf and torch.cuda.is_available():
        configure_allocator(get_logger(), cfg.memory.alloc_conf)
    info = init_distributed(cfg.parallel.comm, cfg.parallel.timeout_s)
    if cfg.parallel.backend == "deepspeed" and not info.distributed:
        raise ConfigError("parallel.backend=deepspeed needs a process group: launch with torchrun "
                          "(also for one process: torchrun --nproc_per_node 1 -m vlmtrain.cli train ...)")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    return info


def train(cfg: RunConfig) -> dict:
    """Run training as configured, in one process or on each rank ``torchrun`` started
    (``parallel.backend``, docs/distributed.md); returns the summary rank 0 writes to ``summary.json``."""
    info = start_process(cfg)
    log = get_logger(info)  # rank 0 logs; the other ranks get a null logger
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = latest_run_checkpoint(out / "checkpoints") if cfg.train.resume else None
    if cfg.train.resume and ckpt is None:
        log.warning("resume=true but no checkpoint in %s: starting from scratch", out / "checkpoints")
    seed_everything(cfg.seed)
    model, data = build_model_and_data(cfg, out, resumed=ckpt is not None)
    if info.world_size > 1:  # the same initial weights on every rank, then each rank its own dropout masks
        seed_everything(cfg.seed + RANK_SEED_STRIDE * (info.rank + 1))
    on_main(save_config, cfg, out / "config.yaml")
    log.info("data: %s", json.dumps(data.stats()))
    trainable = trainable_counts(model)
    log.info("trainable parameters: %s", trainable)

    source = open_feature_source(rank_features(cfg.features, cfg.parallel, info, out), model, out)  # whole weights
    flops = run_flops(model, source)  # counts whole weights too (ZeRO-3 leaves empty placeholders)
    parallel, optimizer, scheduler = parallel_and_optimizer(model, cfg, info, out, source.uses_cache)
    state = {"step": 0, "totals": {"wall_s": 0.0, "samples": 0, "tokens": 0}}
    if ckpt is not None:
        state = load_run_checkpoint(ckpt, parallel, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, state["step"])
    start = state["step"]

    batches, plan = build_batches(cfg, data, model, source, start, cfg.train.steps)
    sink = main_sink(out / "metrics.jsonl", start)
    sample_log = main_sink(out / "samples.jsonl", start, enabled=cfg.train.record_samples)  # rank 0's samples
    meter = StepMeter(flops, device_peak(info.device, cfg.train.precision), info.world_size,
                      reduce_sum=partial(all_reduce_values, op="sum"))
    empty_cache = SyncedEmptyCache(cfg.memory.empty_cache_reserved_gib, on_retries=cfg.memory.empty_cache_on_retries,
                                   enabled=cfg.memory.empty_cache_on_retries or cfg.memory.empty_cache_reserved_gib > 0)
    parallel.train()
    source.settle(model)
    with Progress(cfg.train.steps, start, enabled=cfg.train.progress, silent=not info.is_main) as bar:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            micro = batches.next()
            t1 = time.perf_counter()
            result = train_step(model, micro, optimizer, scheduler, cfg.optim.grad_clip, cfg.train.precision,
                                info.device, source, world_size=info.world_size, parallel=parallel)
            meter.update(micro, result, data_s=t1 - t0, step_s=time.perf_counter() - t0,
                         lr=optimizer.param_groups[0]["lr"])
            empty_cache(info.device)  # all ranks at the same step, or none
            sample_log.log(step, {"sample_ids": [i for b in micro for i in b.sample_ids]})
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                metrics = log_metrics(meter, plan.epoch_of(step), info, empty_cache)
                sink.log(step, metrics)
                bar.update(step, metrics)
            else:
                bar.update(step)
            if (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or step == cfg.train.steps:
                state = {"totals": add_totals(state["totals"], meter)}
                save_run_checkpoint(out / "checkpoints", step, parallel, optimizer, scheduler, state,
                                    cfg.train.keep_checkpoints)
    batches.close()
    sink.close()
    sample_log.close()
    source.close()
    on_main(save_final_model, model_for_saving(parallel, lambda: build_model(cfg, data)), out / "model")
    summary = dict(meter.summary(cfg.train.steps, state["totals"], data.stats(), trainable), world_size=info.world_size)
    on_main((out / "summary.json").write_text, json.dumps(summary, indent=1))
    return summary
