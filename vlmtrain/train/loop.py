"""``train(cfg)``: the whole run, top to bottom (the builders live in ``train/build.py``)."""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from vlmtrain.config import ConfigError, RunConfig, save_config
from vlmtrain.features.source import open_feature_source
from vlmtrain.metrics.meter import StepMeter
from vlmtrain.metrics.progress import Progress
from vlmtrain.metrics.sinks import JsonlSink, NullSink
from vlmtrain.metrics.tracking import FanoutSink, open_tracking
from vlmtrain.models.parts import trainable_counts
from vlmtrain.parallel.init import DistInfo, all_reduce_max, all_reduce_values, get_logger, init_distributed, on_main
from vlmtrain.parallel.memory import SyncedEmptyCache, configure_allocator, memory_stats, rank_metrics
from vlmtrain.parallel.root import unwrap
from vlmtrain.train.build import (
    build_batches, build_model, build_model_and_data, build_plan, build_val_data, device_peak, parallel_and_optimizer,
    rank_features, resolve_steps, run_flops, seed_everything,
)
from vlmtrain.train.checkpoint import (
    latest_run_checkpoint, load_run_checkpoint, model_for_saving, recover_best, save_best_model, save_run_checkpoint,
)
from vlmtrain.train.guards import Preemption, check_step, fault_steps
from vlmtrain.train.reproducible import configure_threads_and_determinism
from vlmtrain.train.step import autocast_context, train_step
from vlmtrain.metrics.report import write_run_report  # reads only the run's files; matplotlib loads lazily
from vlmtrain.train.validate import BestTracker, ValidationSet, better_is_lower, validate_rollouts, validate_samples, validation_set

RANK_SEED_STRIDE = 1_000_003  # rank r of a multi-process run draws from seed + stride * (r + 1) after the model is built


def main_sink(path: Path, start: int, enabled: bool = True):
    """A JSONL sink on rank 0 (a resumed run drops the lines after ``start`` and rewrites them); a null
    sink on the other ranks or when not ``enabled``."""
    return (on_main(JsonlSink, path, truncate_after_step=start) if enabled else None) or NullSink()


def run_sink(cfg: RunConfig, out: Path, start: int):
    """Where the loop's metrics go: ``metrics.jsonl`` plus the trackers ``tracking.*`` enables
    (TensorBoard, W&B, MLflow, with the resolved config), on rank 0; a null sink elsewhere."""
    jsonl = main_sink(out / "metrics.jsonl", start)
    trackers = on_main(open_tracking, cfg.tracking, out, dataclasses.asdict(cfg), out.name) or []
    return FanoutSink([jsonl, *trackers]) if trackers else jsonl


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


def validate(cfg: RunConfig, vset: Optional[ValidationSet], parallel, source, info: DistInfo) -> dict:
    """The ``val/*`` and ``eval/*`` metrics of the model now (collective), in eval mode and without
    touching the training RNG streams; the model is back in training mode afterwards."""
    devices = [info.device] if info.device.type == "cuda" else []
    metrics: dict = {}
    parallel.train(False)
    try:
        with torch.random.fork_rng(devices=devices), autocast_context(cfg.train.precision, info.device):
            if vset is not None:
                metrics.update(validate_samples(vset, unwrap(parallel), parallel, info.device, info.rank, info.world_size))
            if cfg.eval.rollout_episodes:
                metrics.update(validate_rollouts(unwrap(parallel), cfg, info.device, info.rank, info.world_size))
    finally:
        parallel.train()
        source.settle(unwrap(parallel))
    return metrics


def start_process(cfg: RunConfig) -> DistInfo:
    """This process's part of the job: the CUDA allocator setting and torch threads /
    ``train.deterministic`` (before CUDA starts), the process group when ``torchrun`` started it (gloo
    on CPU, nccl on CUDA). DeepSpeed needs the process group even for one process
    (``torchrun --nproc_per_node 1``)."""
    if cfg.memory.alloc_conf and torch.cuda.is_available():
        configure_allocator(get_logger(), cfg.memory.alloc_conf)
    configure_threads_and_determinism(cfg.train.threads, cfg.train.deterministic, get_logger())
    info = init_distributed(cfg.parallel.comm, cfg.parallel.timeout_s)
    if cfg.parallel.backend == "deepspeed" and not info.distributed:
        raise ConfigError("parallel.backend=deepspeed needs a process group: launch with torchrun "
                          "(also for one process: torchrun --nproc_per_node 1 -m vlmtrain.cli train ...)")
    return info


def train(cfg: RunConfig) -> dict:
    """Run training as configured, in one process or on each rank ``torchrun`` started
    (``parallel.backend``, docs/distributed.md); returns the summary rank 0 writes to ``summary.json``.
    Loader workers, metric sinks and the feature cache are closed however the run ends."""
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
    log.info("data: %s", json.dumps(data.stats()))
    val_data = build_val_data(cfg, model)
    vset = validation_set(val_data, cfg.eval.val_batch_size, cfg.eval.val_samples, cfg.seed) if val_data else None
    if vset is not None:
        log.info("validation: %d held-out samples in %d batches, every %d steps", vset.samples, len(vset.batches),
                 cfg.eval.every)
    trainable = trainable_counts(model)
    log.info("trainable parameters: %s", trainable)

    source = open_feature_source(rank_features(cfg.features, cfg.parallel, info, out), model, out,
                                 frames=len(data.frames))  # whole weights
    plan = build_plan(cfg, data, model, source.uses_cache)  # this rank's step plan, planned once
    cfg = resolve_steps(cfg, plan, info.world_size)  # train.epochs -> train.steps, optim.warmup_ratio -> warmup_steps
    on_main(save_config, cfg, out / "config.yaml")
    flops = run_flops(model, source)  # counts whole weights too (ZeRO-3 leaves empty placeholders)
    parallel, optimizer, scheduler = parallel_and_optimizer(model, cfg, info, out, source.uses_cache)
    state = {"step": 0, "totals": {"wall_s": 0.0, "samples": 0, "tokens": 0}}
    if ckpt is not None:
        state = load_run_checkpoint(ckpt, parallel, optimizer, scheduler)
        log.info("resumed from %s at step %d", ckpt, state["step"])
    start = state["step"]
    tracker = (BestTracker.restore(cfg.train.best_metric, better_is_lower(cfg.train.best_metric, cfg.train.best_mode),
                                   state.get("best")) if cfg.train.best_metric else None)
    on_main(recover_best, out / "checkpoints")
    rebuild = lambda: build_model(cfg, model.tokenizer)  # noqa: E731  (a fresh copy to gather shards into)

    meter = StepMeter(flops, device_peak(info.device, cfg.train.precision), info.world_size,
                      reduce_sum=partial(all_reduce_values, op="sum"), skipped=state.get("nonfinite_skipped", 0))
    empty_cache = SyncedEmptyCache(cfg.memory.empty_cache_reserved_gib, on_retries=cfg.memory.empty_cache_on_retries,
                                   enabled=cfg.memory.empty_cache_on_retries or cfg.memory.empty_cache_reserved_gib > 0)
    faults = fault_steps(info.rank)  # steps poisoned with NaN ($VLMTRAIN_FAULT_NONFINITE; tests and drills)
    batches = sink = sample_log = None
    stopped_at = None  # the step a preemption signal stopped the run after
    last = start  # the last step run
    early_stop = False
    preemption = Preemption()  # from here on SIGTERM / SIGUSR1 mean "checkpoint after this step and exit 0"
    try:
        batches, _ = build_batches(cfg, data, model, source, start, cfg.train.steps, plan=plan)
        sink = run_sink(cfg, out, start)
        sample_log = main_sink(out / "samples.jsonl", start, enabled=cfg.train.record_samples)  # rank 0's samples
        parallel.train()
        source.settle(model)
        with Progress(cfg.train.steps, start, enabled=cfg.train.progress, silent=not info.is_main) as bar:
            for step in range(start + 1, cfg.train.steps + 1):
                t0 = time.perf_counter()
                micro = batches.next()
                t1 = time.perf_counter()
                result = train_step(model, micro, optimizer, scheduler, cfg.optim.grad_clip, cfg.train.precision,
                                    info.device, source, world_size=info.world_size, parallel=parallel,
                                    inject_nonfinite=step in faults)
                sample_log.log(step, {"sample_ids": [i for b in micro for i in b.sample_ids]})
                check_step(step, result, micro, cfg.train.on_nonfinite, log)  # skip (warn) or stop, all ranks alike
                meter.update(micro, result, data_s=t1 - t0, step_s=time.perf_counter() - t0,
                             lr=optimizer.param_groups[0]["lr"])
                empty_cache(info.device)  # all ranks at the same step, or none
                last = step
                preempted = preemption.requested(info.world_size)  # every rank stops after the same step
                validated = cfg.eval.every > 0 and (step % cfg.eval.every == 0 or step == cfg.train.steps)
                val_metrics = validate(cfg, vset, parallel, source, info) if validated else {}
                if tracker is not None and validated:
                    if tracker.update(step, val_metrics):
                        save_best_model(out / "checkpoints", parallel, rebuild, tracker.state())
                        log.info("best %s %.6g at step %d: saved %s", tracker.metric, tracker.value, step,
                                 out / "checkpoints" / "best")
                    early_stop = 0 < cfg.train.early_stop_patience <= tracker.stale
                if step % cfg.train.log_every == 0 or step == cfg.train.steps or preempted or validated:
                    metrics = {**log_metrics(meter, plan.epoch_of(step), info, empty_cache), **val_metrics}
                    sink.log(step, metrics)
                    bar.update(step, metrics)
                else:
                    bar.update(step)
                end = step == cfg.train.steps or preempted or early_stop
                if (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or end:
                    state = {"totals": add_totals(state["totals"], meter), "nonfinite_skipped": meter.skipped_total,
                             **({"best": tracker.state()} if tracker is not None else {})}
                    save_run_checkpoint(out / "checkpoints", step, parallel, optimizer, scheduler, state,
                                        cfg.train.keep_checkpoints)
                if preempted:
                    log.warning("%s: stopped after step %d with a checkpoint; continue with train.resume=true",
                                preemption.name, step)
                    stopped_at = step
                    break
                if early_stop:
                    log.warning("early stop after step %d: %s has not improved on %.6g (step %d) for %d validations",
                                step, tracker.metric, tracker.value, tracker.step, tracker.stale)
                    break
    finally:
        preemption.close()
        for resource in (batches, sink, sample_log, source):
            if resource is not None:
                resource.close()
    if stopped_at is not None:  # no final model: the run is not finished
        summary = {"preempted_at_step": stopped_at, "steps": cfg.train.steps, "world_size": info.world_size,
                   "nonfinite_skipped": meter.skipped_total}
        on_main((out / "summary.json").write_text, json.dumps(summary, indent=1))
        on_main(write_run_report, out)  # report.html, marked preempted
        return summary
    on_main(lambda m: m.save_final(out / "model"), model_for_saving(parallel, rebuild))
    summary = dict(meter.summary(last, state["totals"], data.stats(), trainable), world_size=info.world_size,
                   nonfinite_skipped=meter.skipped_total)
    if tracker is not None:
        summary["best"] = {**tracker.state(), "path": str(out / "checkpoints" / "best")}
    if early_stop:
        summary["early_stopped_at_step"] = last
    on_main((out / "summary.json").write_text, json.dumps(summary, indent=1))
    on_main(write_run_report, out)  # OUTPUT_DIR/report.html; a failure is a logged warning, never a failed run
    return summary
