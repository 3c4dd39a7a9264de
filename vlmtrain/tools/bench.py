"""``vlmtrain bench``: measure a config's training step, next to its LM-only floor and (optionally) the
naive pipeline, in one process on the same model and data.

Three measurements, in this order, each over the same number of steps after the same warm-up:

1. **the run as configured**: the real data path (plan, prefetch, feature cache, packing) and the real
   ``train_step``, timed per phase (data wait, vision, LM forward, backward, optimizer);
2. **the LM-only floor**: the same language model's forward + backward on exactly the micro-batches of
   (1) — the same packed real tokens — with their image features computed beforehand and held in
   memory: no vision encoder, no projector, no data loading, no optimizer. A pipeline cannot beat it,
   so ``step_over_floor`` says how much the rest of the system costs;
3. ``--compare naive``: the same model (reset to the same initial weights, a fresh optimizer) and data
   with padded batches, every image slot encoded (no de-duplication) and no feature cache.

With a feature cache, every frame of the data is encoded into it first (``vlmtrain cache``) unless
``warm_cache=False``; the seconds this took are reported, not counted in the step times.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from vlmtrain.config import RunConfig
from vlmtrain.features.precompute import precompute_features
from vlmtrain.features.source import FeatureSource, open_feature_source
from vlmtrain.metrics.meter import StepMeter
from vlmtrain.train.build import build_batches, build_model_and_data, device_peak, run_flops, seed_everything
from vlmtrain.train.optim import build_optimizer, build_scheduler
from vlmtrain.train.reproducible import configure_threads_and_determinism
from vlmtrain.train.step import PHASES, PhaseTimer, autocast_context, lm_loss, train_step

log = logging.getLogger("vlmtrain")

# Keys of StepMeter.flush copied into the bench line (renamed without their group prefix).
METER_KEYS = {
    "throughput/samples_per_s": "samples_per_s", "throughput/tokens_per_s": "tokens_per_s",
    "throughput/tgs": "tgs", "throughput/tflops": "tflops", "throughput/mfu": "mfu",
    "data/padding_efficiency": "padding_efficiency", "time/data_wait_pct": "data_wait_pct",
    "vision/frames_encoded_per_sample": "frames_encoded_per_sample",
    "vision/unique_frames_per_sample": "unique_frames_per_sample", "data/images_per_sample": "images_per_sample",
    "data/tokens_per_sample": "tokens_per_sample", "cache/hit_rate": "cache_hit_rate",
    "spatial/frames_encoded_per_sample": "spatial_frames_encoded_per_sample",
    "spatial/cache_hit_rate": "spatial_cache_hit_rate",
    "balance/tokens_max_over_min": "rank_tokens_max_over_min", "balance/vision_max_over_min": "rank_vision_max_over_min",
    "loss/train": "loss",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(cfg: RunConfig, data, model, source: FeatureSource, device: torch.device, warmup: int, steps: int,
              dedup: bool = True, packing: Optional[bool] = None) -> tuple[dict, list]:
    """Train ``warmup + steps`` steps through the real data path; (metrics of the measured steps, their
    micro-batches). Phase times are synchronised with the device (CUDA) so each phase is charged fully."""
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, warmup + steps)
    batches, _ = build_batches(cfg, data, model, source, 0, warmup + steps, dedup=dedup, packing=packing)
    meter = StepMeter(run_flops(model, source), device_peak(device, cfg.train.precision))
    timer = PhaseTimer(sync=True)
    model.train()
    source.settle(model)
    step_times, kept, per_step = [], [], []
    phase_totals = dict.fromkeys(PHASES, 0.0)
    try:
        for k in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            micro = batches.next()
            t1 = time.perf_counter()
            result = train_step(model, micro, optimizer, scheduler, cfg.optim.grad_clip, cfg.train.precision,
                                device, source, timer)
            _sync(device)
            t2 = time.perf_counter()
            phases = timer.pop()
            if k < warmup:
                continue
            meter.update(micro, result, data_s=t1 - t0, step_s=t2 - t0, lr=optimizer.param_groups[0]["lr"])
            step_times.append(t2 - t0)
            kept.append(micro)
            per_step.append({"step_s": t2 - t0, "samples": sum(b.num_samples for b in micro),
                             "tokens": sum(b.num_tokens for b in micro), "loss": float(result["loss"])})
            phases["data"] = t1 - t0
            for name in PHASES:
                phase_totals[name] += phases.get(name, 0.0)
    finally:
        batches.close()
    out = {new: v for old, v in meter.flush(epoch=0.0).items() if (new := METER_KEYS.get(old))}
    out["step_s"] = round(statistics.fmean(step_times), 5)
    out["step_s_median"] = round(statistics.median(step_times), 5)
    out["breakdown_s"] = {name: round(total / steps, 5) for name, total in phase_totals.items()}
    out["samples_per_step"] = round(sum(b.num_samples for m in kept for b in m) / steps, 2)
    out["threads"] = torch.get_num_threads()
    out["per_step"] = per_step
    return out, kept


def lm_floor(model, kept: list, source: FeatureSource, device: torch.device, precision: str) -> dict:
    """Forward + backward of the language model alone on the measured micro-batches, features in memory."""
    with torch.no_grad(), autocast_context(precision, device):
        features = [[source.features(model, b, device)[0].detach() for b in micro] for micro in kept]
    times = []
    model.train()
    source.settle(model)
    for micro, feats in zip(kept, features):
        total = sum(b.num_label_tokens for b in micro)
        _sync(device)
        t0 = time.perf_counter()
        for b, f in zip(micro, feats):
            with autocast_context(precision, device):
                loss = lm_loss(model, b, f, device)
            (loss * (b.num_label_tokens / max(total, 1))).backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return {"step_s": round(statistics.fmean(times), 5), "step_s_median": round(statistics.median(times), 5)}


def machine() -> dict:
    """Where the figures were measured."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def prepare(cfg: RunConfig) -> tuple[Path, object, object, torch.device, FeatureSource]:
    """(output dir, model on the device, data, device, feature source) of a measurement of ``cfg``:
    threads and determinism set, everything seeded. The caller closes the source."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    configure_threads_and_determinism(cfg.train.threads, cfg.train.deterministic, log)
    seed_everything(cfg.seed)
    model, data = build_model_and_data(cfg, out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    return out_dir, model, data, device, open_feature_source(cfg.features, model, out_dir, frames=len(data.frames))


def bench(cfg: RunConfig, warmup: int = 3, steps: int = 15, compare: Optional[str] = None,
          warm_cache: bool = True) -> dict:
    """Benchmark ``cfg`` as described in the module docstring; returns the bench record (also written
    to ``output_dir/bench.json``)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    out_dir, model, data, device, source = prepare(cfg)
    initial = copy.deepcopy(model.state_dict()) if compare else None
    record: dict = {"config": {"family": cfg.model.family, "packing": cfg.data.packing,
                               "feature_cache": source.uses_cache, "split_cache": source.split,
                               "precision": cfg.train.precision, "batch_size": cfg.train.batch_size,
                               "grad_accum": cfg.train.grad_accum, "warmup": warmup, "steps": steps},
                    "machine": machine()}
    if source.uses_cache and warm_cache:
        record["cache_fill"] = precompute_features(model, source, data.frames, device)
    try:
        run, kept = run_steps(cfg, data, model, source, device, warmup, steps)
        floor = lm_floor(model, kept, source, device, cfg.train.precision)
    finally:
        source.close()
    run.pop("per_step")
    record.update(run)
    record["lm_floor_step_s"] = floor["step_s"]
    record["lm_floor_step_s_median"] = floor["step_s_median"]
    record["step_over_floor"] = round(run["step_s"] / floor["step_s"], 3)
    if compare == "naive":
        model.load_state_dict(initial)
        seed_everything(cfg.seed)
        naive_cfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, cache="off"))
        naive, _ = run_steps(naive_cfg, data, model, FeatureSource(), device, warmup, steps, dedup=False,
                             packing=False)
        naive.pop("per_step")
        record["naive"] = naive
        record["speedup_samples_per_s"] = round(run["samples_per_s"] / max(naive["samples_per_s"], 1e-9), 3)
        record["speedup_tokens_per_s"] = round(run["tokens_per_s"] / max(naive["tokens_per_s"], 1e-9), 3)
    elif compare is not None:
        raise ValueError(f"--compare {compare!r}: only 'naive' is known")
    (out_dir / "bench.json").write_text(json.dumps(record, indent=1))
    return record
