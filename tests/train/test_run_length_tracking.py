"""A run's length from epochs and warmup ratio, logged at start, and its metrics in TensorBoard equal
to metrics.jsonl (the trackers wired into the loop, not only the sinks on their own)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from vlmtrain.config import ConfigError, load_config
from vlmtrain.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_epochs_and_warmup_ratio_resolve_and_are_logged(tiny_cfg, caplog):
    tiny_cfg.train.epochs, tiny_cfg.optim.warmup_ratio = 2.0, 0.25
    tiny_cfg.train.ckpt_every = 0
    with caplog.at_level(logging.INFO, logger="vlmtrain"):
        summary = train(tiny_cfg)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("run length:"))
    per_epoch = int(line.split("(")[1].split(",")[1].split()[0])
    steps = math.ceil(2.0 * per_epoch)
    assert summary["steps"] == steps and f"run length: {steps} steps (2 epochs" in line
    assert f"warmup {math.ceil(0.25 * steps)} steps, global batch 16 samples (1 micro-batches x 1 ranks)" in line
    saved = load_config(yaml_path=Path(tiny_cfg.output_dir) / "config.yaml")
    assert (saved.train.steps, saved.optim.warmup_steps) == (steps, math.ceil(0.25 * steps))


def test_warmup_ratio_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.warmup_ratio=1.5"):
        load_config(overrides=["optim.warmup_ratio=1.5"])


def test_tensorboard_holds_the_same_scalars_as_metrics_jsonl(tiny_cfg):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_cfg.tracking.tensorboard = True
    tiny_cfg.train.steps, tiny_cfg.train.ckpt_every = 10, 0
    train(tiny_cfg)
    out = Path(tiny_cfg.output_dir)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    numeric = {k for line in lines for k, v in line.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(acc.Tags()["scalars"]) == numeric and "loss/train" in numeric
    for key in numeric:
        logged = {l["step"]: l[key] for l in lines if key in l}
        events = {e.step: e.value for e in acc.Scalars(key)}
        assert events.keys() == logged.keys(), key
        assert all(events[s] == pytest.approx(v, rel=1e-6, abs=1e-6) for s, v in logged.items()), key
