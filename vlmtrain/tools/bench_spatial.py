"""``vlmtrain bench --compare spatial``: what a spatial branch (``model.spatial_encoder``) costs per step.

Three measurements of the same config, each on a freshly built model and data (same seed), over the
same warm-up and measured steps, one after the other in one process:

1. **without**: ``model.spatial_encoder`` emptied, the recipe without its spatial branch;
2. **cold**: the branch without its feature cache, so its frozen encoder runs on every unique frame of
   every step (what a recipe without a cache pays, JanusVLN's 60-70 % of a step);
3. **warm**: the branch's cache filled with every frame first (``vlmtrain cache``; the seconds are
   reported, not counted), so its encoder runs 0 times and only its projector trains.

The main visual features are handled as configured in all three (their cache, when there is one, is
filled first in each). ``warm_over_without`` is what the recipe costs once its spatial features are
cached; the issue's target is at most 1.10. ``--repeats N`` runs the three in turn N times and
reports medians.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from vlmtrain.config import ConfigError, RunConfig
from vlmtrain.features.precompute import precompute_features
from vlmtrain.tools.bench import machine, prepare, run_steps

MODES = ("without", "cold", "warm")


def _measure(cfg: RunConfig, mode: str, warmup: int, steps: int) -> dict:
    out_dir = Path(cfg.output_dir) / "bench_spatial" / mode
    model_cfg = dataclasses.replace(cfg.model, spatial_encoder="") if mode == "without" else cfg.model
    run_cfg = dataclasses.replace(cfg, model=model_cfg, output_dir=str(out_dir))
    _, model, data, device, source = prepare(run_cfg)
    try:
        if mode == "cold" and source.spatial_cache is not None:
            source.spatial_cache.close()  # the encoder runs on every frame: no cache at all
            source.spatial_cache = None
        fill = None
        if source.needs_frame_keys:
            fill = precompute_features(model, source, data.frames, device)
        run, _ = run_steps(run_cfg, data, model, source, device, warmup, steps)
    finally:
        source.close()
    run.pop("per_step")
    if fill is not None:
        run["cache_fill"] = fill
    return run


def compare_spatial(cfg: RunConfig, warmup: int = 3, steps: int = 15, repeats: int = 1) -> dict:
    """The three measurements of the module docstring and their ratios; ``repeats`` > 1 runs the three
    in turn that many times (without, cold, warm, without, ...) and reports each mode's median step
    time over the repeats (``step_s``; every repeat's in ``step_s_runs``), so a slow spell of a shared
    machine does not fall on one mode only."""
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: must be >= 1")
    if not cfg.model.spatial_encoder:
        raise ConfigError("--compare spatial needs model.spatial_encoder (the recipe with its spatial branch)")
    record: dict = {"config": {"family": cfg.model.family, "spatial_encoder": cfg.model.spatial_encoder,
                               "spatial_weight": cfg.model.spatial_weight, "batch_size": cfg.train.batch_size,
                               "warmup": warmup, "steps": steps, "repeats": repeats},
                    "machine": machine()}
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            runs[mode].append(_measure(cfg, mode, warmup, steps))
    for mode in MODES:
        times = [r["step_s"] for r in runs[mode]]
        record[mode] = {**runs[mode][-1], "step_s": round(statistics.median(times), 5), "step_s_runs": times}
    base = record["without"]["step_s"]
    for mode in ("cold", "warm"):
        record[f"{mode}_over_without"] = round(record[mode]["step_s"] / base, 3)
    return record


def format_spatial(record: dict) -> str:
    """The comparison as a short table (step time, samples/s, spatial frames encoded per sample)."""
    lines = [f"{'spatial branch':<16}{'step s':>10}{'samples/s':>12}{'spatial enc/sample':>20}{'x without':>11}"]
    for mode in MODES:
        r = record[mode]
        ratio = "1.000" if mode == "without" else f"{record[f'{mode}_over_without']:.3f}"
        enc = r.get("spatial_frames_encoded_per_sample", "-")
        per_s = r["samples_per_step"] / r["step_s"]
        lines.append(f"{mode:<16}{r['step_s']:>10.4f}{per_s:>12.1f}{enc!s:>20}{ratio:>11}")
    return "\n".join(lines)
