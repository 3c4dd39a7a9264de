"""Presets are plain functions returning a RunConfig."""

from __future__ import annotations

from typing import Callable

from vlmtrain.config import RunConfig


def gridnav() -> RunConfig:
    """The CPU demo: GridNav generated on first use, a ~1 M-parameter composed VLM, a few minutes on 2 cores."""
    cfg = RunConfig(output_dir="runs/gridnav")
    cfg.data.root = "data/gridnav/train"
    cfg.data.gridnav_episodes = 1500
    # One history frame (plus the current one) rather than InternVLA-N1's eight: on 2 CPU cores the
    # vision encoder dominates the step, and 2 frames per sample buy the optimizer steps the demo's
    # 8-minute budget needs (docs/benchmarks.md, "GridNav demo", has the measurements).
    cfg.data.num_history = 1
    cfg.model.history_tokens = 1
    cfg.train.steps = 1200
    cfg.train.batch_size = 128
    cfg.train.ckpt_every = 300
    cfg.optim.warmup_steps = 60
    # Closed-loop validation on 100 held-out `val` layouts every 300 steps keeps the best model,
    # which `vlmtrain eval` then reports (SR moves by up to 0.2 between neighbouring validations).
    cfg.eval.every = 300
    cfg.eval.rollout_episodes = 100
    cfg.train.best_metric = "eval/sr"
    return cfg


def gridnav_tiny() -> RunConfig:
    """Seconds-long GridNav run for tests and smoke checks (tiny data, tiny model)."""
    cfg = gridnav()
    cfg.output_dir = "runs/gridnav_tiny"
    cfg.data.root = "data/gridnav_tiny/train"
    cfg.data.gridnav_episodes = 24
    cfg.data.load_workers = 1
    cfg.model.vision_hidden = 32
    cfg.model.vision_intermediate = 64
    cfg.model.vision_heads = 2
    cfg.model.lm_hidden = 32
    cfg.model.lm_intermediate = 64
    cfg.model.lm_heads = 2
    cfg.model.lm_kv_heads = 2
    cfg.train.steps = 20
    cfg.train.batch_size = 16
    cfg.train.log_every = 5
    cfg.train.ckpt_every = 10
    cfg.optim.warmup_steps = 2
    cfg.optim.lr = 5e-3  # a tiny model on a short schedule tolerates (and needs) a high rate
    cfg.eval.episodes = 8
    cfg.eval.every, cfg.eval.rollout_episodes, cfg.train.best_metric = 0, 0, ""  # no validation
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {"gridnav": gridnav, "gridnav_tiny": gridnav_tiny}


def get_preset(name: str) -> RunConfig:
    """The preset's config; unknown names list the valid ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}': choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
