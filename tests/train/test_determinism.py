"""Run-to-run reproducibility with the settings a user gets: torch's default intra-op threads (two
on a 2-core CI machine), no ``train.threads``; and what ``train.deterministic=true`` adds.

Before ``models.protocol.take_rows``, two identical default gridnav runs ended with different weights:
the backward of the visual-token gather (one history frame fills the slots of many samples) summed
rows in a thread-dependent order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmtrain.models.protocol import take_rows
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
from vlmtrain.train.loop import train

THREADS = torch.get_num_threads()
multi_threaded = pytest.mark.skipif(THREADS < 2, reason="one intra-op thread: nothing to reorder")


def _grad_bits(table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, gather) -> bytes:
    table.grad = None
    (gather(table, index) * weight).sum().backward()
    return table.grad.numpy().tobytes()


@multi_threaded
def test_visual_token_gather_backward_is_bitwise_repeatable():
    """The demo's shapes: ~400 unique frames x 4 tokens x 64 channels filling ~380 slots, most frames
    used by several slots. 30 backwards on default threads give one gradient."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(400, 4, 64, generator=g).requires_grad_()
    index = torch.randint(0, 400, (380,), generator=g)
    weight = torch.randn(380, 4, 64, generator=g)
    assert torch.equal(take_rows(table, index), table[index])
    grads = {_grad_bits(table, index, weight, take_rows) for _ in range(30)}
    assert len(grads) == 1, f"{len(grads)} different gradients in 30 identical backwards on {THREADS} threads"


def test_take_rows_keeps_trailing_shape_and_dtype():
    table = torch.arange(24, dtype=torch.bfloat16).reshape(3, 2, 4)
    out = take_rows(table, torch.tensor([2, 0, 2]))
    assert out.shape == (3, 2, 4) and out.dtype == torch.bfloat16
    assert torch.equal(out[0], table[2]) and torch.equal(out[1], table[0]) and torch.equal(out[2], table[2])


@multi_threaded
def test_demo_step_gradients_are_bitwise_repeatable(gridnav_root, tmp_path):
    """The demo preset's model and batch size on the session GridNav data: four forward/backward passes
    of one training step's batch on default threads give the same gradient in every tensor (before
    ``take_rows`` 40 of 63 tensors differed from the second pass on)."""
    from vlmtrain.features.source import FeatureSource
    from vlmtrain.presets import gridnav
    from vlmtrain.train.build import build_batches, build_model_and_data, seed_everything
    from vlmtrain.train.step import micro_loss

    cfg = gridnav()
    cfg.data.root, cfg.data.gridnav_episodes, cfg.output_dir = str(gridnav_root), 0, str(tmp_path / "run")
    seed_everything(cfg.seed)
    model, data = build_model_and_data(cfg, tmp_path / "run")
    batches, _ = build_batches(cfg, data, model, FeatureSource(), 0, 1)
    micro = batches.next()
    batches.close()
    assert sum(m.pixels.shape[0] for m in micro) < sum(len(m.sample_ids) for m in micro) * 3  # frames shared
    grads = []
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        for b in micro:
            micro_loss(model, b, torch.device("cpu"), FeatureSource())[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for i, g in enumerate(grads[1:], 1):
        _assert_bitwise(grads[0], g)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


@multi_threaded
def test_two_default_composed_runs_end_with_equal_weights(tiny_cfg, tmp_path):
    """The composed model with its default settings (threads left to torch), 60 steps twice."""
    assert tiny_cfg.train.threads == 0 and not tiny_cfg.train.deterministic
    tiny_cfg.train.steps, tiny_cfg.train.ckpt_every = 60, 0
    runs = []
    for name in ("a", "b"):
        tiny_cfg.output_dir = str(tmp_path / name)
        train(tiny_cfg)
        runs.append(_weights(tmp_path / name))
    assert torch.get_num_threads() == THREADS
    _assert_bitwise(*runs)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return save_tiny_qwen_vl(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", family="qwen2_5_vl", seed=0)


@multi_threaded
def test_two_default_qwen_lora_runs_end_with_equal_weights(tiny_qwen, gridnav_root, tmp_path, qwen_lora_cfg):
    runs = []
    for name in ("a", "b"):
        cfg = qwen_lora_cfg(tiny_qwen, gridnav_root, tmp_path / name)
        cfg.train.steps = 12
        train(cfg)
        runs.append(_weights(tmp_path / name))
    _assert_bitwise(*runs)


def test_deterministic_mode_switches_torch_and_trains_the_same_weights(tiny_cfg, tmp_path, caplog, monkeypatch):
    """``train.deterministic=true`` on CPU: every op of a composed training step has a deterministic
    kernel (none raises), the settings are on and logged, and the weights equal a default run's. The
    process-wide switches are put back afterwards by tests/conftest.py."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    tiny_cfg.train.steps, tiny_cfg.train.ckpt_every = 30, 0
    tiny_cfg.output_dir = str(tmp_path / "default")
    train(tiny_cfg)
    assert not torch.are_deterministic_algorithms_enabled()
    caplog.set_level("INFO", logger="vlmtrain")
    tiny_cfg.train.deterministic = True
    tiny_cfg.output_dir = str(tmp_path / "det")
    train(tiny_cfg)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert f"deterministic: deterministic algorithms on, {THREADS} intra-op threads" in caplog.text
    _assert_bitwise(_weights(tmp_path / "default"), _weights(tmp_path / "det"))
