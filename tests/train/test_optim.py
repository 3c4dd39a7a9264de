import copy

import pytest
import torch
from torch import nn

from vlmtrain.config import OptimConfig, TrainConfig
from vlmtrain.models.parts import PARTS, model_parts, trainable_counts
from vlmtrain.train.optim import apply_freeze, build_optimizer, build_scheduler, can_fuse, lr_factor


class TinyVLM(nn.Module):
    """Three parts with hand-countable parameters; ``part_of`` maps the first name component."""

    PART = {"vision": "vision", "projector": "projector", "lm": "llm"}

    def __init__(self):
        super().__init__()
        self.vision = nn.ModuleDict(dict(proj=nn.Linear(4, 3), norm=nn.LayerNorm(3)))  # 12 + 3, 3 + 3: 21
        self.projector = nn.Linear(3, 5, bias=False)  # 15
        self.lm = nn.ModuleDict(dict(embed_tokens=nn.Embedding(7, 5), layer=nn.Linear(5, 5),
                                     norm=nn.LayerNorm(5)))  # 35, 25 + 5, 5 + 5: 75

    def part_of(self, name: str) -> str:
        return self.PART[name.split(".")[0]]


def _optim_cfg(**kw) -> OptimConfig:
    cfg = OptimConfig()
    for k, v in dict(lr=5e-4, weight_decay=0.01, beta1=0.9, beta2=0.95, eps=1e-8, warmup_steps=10,
                     min_lr_ratio=0.1, **kw).items():
        setattr(cfg, k, v)
    return cfg


def _group_names(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [names[id(p)] for p in g["params"]] for g in opt.param_groups}


def test_schedule_warmup_cosine_floor():
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)
    values = [lr_factor(s, 10, 110, 0.1) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_model_parts_follow_part_of():
    m = TinyVLM()
    assert PARTS == ("vision", "projector", "llm")
    parts = {part: [n for n, _ in params] for part, params in model_parts(m).items()}
    assert parts == {
        "vision": ["vision.proj.weight", "vision.proj.bias", "vision.norm.weight", "vision.norm.bias"],
        "projector": ["projector.weight"],
        "llm": ["lm.embed_tokens.weight", "lm.layer.weight", "lm.layer.bias", "lm.norm.weight", "lm.norm.bias"],
    }
    assert trainable_counts(m) == {"vision": 21, "projector": 15, "llm": 75}


def test_per_part_rates_and_freeze():
    m = TinyVLM()
    tcfg = TrainConfig()
    tcfg.freeze_vision, tcfg.freeze_projector, tcfg.freeze_llm = False, True, False
    counts = apply_freeze(m, tcfg)
    assert counts == {"vision": 21, "projector": 0, "llm": 75}
    assert not m.projector.weight.requires_grad and m.vision.proj.weight.requires_grad
    assert trainable_counts(m) == counts

    ocfg = _optim_cfg(lr_vision=1e-4, lr_llm=2e-3)
    opt = build_optimizer(m, ocfg)
    # One group per (trained part, decay); the frozen projector has none. Matrices decay; biases,
    # norm gains and the embedding table (2-D, but named "embed") do not.
    assert _group_names(m, opt) == {
        "vision/decay": ["vision.proj.weight"],
        "vision/no_decay": ["vision.proj.bias", "vision.norm.weight", "vision.norm.bias"],
        "llm/decay": ["lm.layer.weight"],
        "llm/no_decay": ["lm.embed_tokens.weight", "lm.layer.bias", "lm.norm.weight", "lm.norm.bias"],
    }
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups} == {
        "vision/decay": (1e-4, 0.01), "vision/no_decay": (1e-4, 0.0),
        "llm/decay": (2e-3, 0.01), "llm/no_decay": (2e-3, 0.0),
    }
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8

    # Warmup 10 steps, cosine to 10 % at step 110, applied to each group's own peak rate.
    sched = build_scheduler(opt, ocfg, 110)
    expected = {0: 0.1, 9: 1.0, 60: 0.55, 110: 0.1}
    for step in range(111):
        if step in expected:
            lrs = {g["name"]: g["lr"] for g in opt.param_groups}
            assert lrs["vision/decay"] == pytest.approx(1e-4 * expected[step]), step
            assert lrs["llm/no_decay"] == pytest.approx(2e-3 * expected[step]), step
        opt.step()
        sched.step()


def test_unset_part_rate_falls_back_to_lr_and_lora_parts_are_frozen():
    m = TinyVLM()
    tcfg = TrainConfig()
    tcfg.freeze_vision = tcfg.freeze_projector = tcfg.freeze_llm = False
    assert apply_freeze(m, tcfg, also_frozen=("llm",)) == {"vision": 21, "projector": 15, "llm": 0}
    opt = build_optimizer(m, _optim_cfg(lr_vision=1e-4))
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {
        "vision/decay": 1e-4, "vision/no_decay": 1e-4, "projector/decay": 5e-4}


def test_everything_frozen_is_an_error():
    m = TinyVLM()
    tcfg = TrainConfig()
    tcfg.freeze_vision = tcfg.freeze_projector = tcfg.freeze_llm = True
    assert apply_freeze(m, tcfg) == {"vision": 0, "projector": 0, "llm": 0}
    with pytest.raises(ValueError, match="frozen"):
        build_optimizer(m, _optim_cfg())


def test_cpu_parameters_get_the_fused_kernel_and_the_same_update():
    torch.manual_seed(0)
    model = TinyVLM()
    opt = build_optimizer(model, _optim_cfg())
    assert opt.defaults["fused"] is True
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(
        [{**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
          "params": [dict(reference.named_parameters())[n] for n in names]}
         for g, names in zip(opt.param_groups, _group_names(model, opt).values())],
        betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            loss = sum((p * p).sum() for p in m.parameters())
            loss.backward()
            o.step()
            o.zero_grad()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")
    assert not can_fuse([torch.zeros(2, dtype=torch.long)])  # not floating: the default implementation
