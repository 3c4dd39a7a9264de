"""``vlmtrain plan`` against what really happens, on tiny real architectures on CPU.

1. FLOPs: the plan's FLOPs of every step equal the FLOPs model's on the real batches training builds
   (``run_flops`` over ``StepBuilder``'s micro-batches of every rank's ``make_plan``), exactly.
2. Activations: the analytic estimate against the bytes autograd really saves in the forward of one
   real micro-batch (``tools/plan_measure.py``: unique storages of saved tensors, parameters and
   buffers left out), within 15 %, for the composed preset, a Qwen2.5-VL LoRA run and a Qwen2.5-VL
   full fine-tune, each also with activation checkpointing on. With checkpointing the measured
   figure is the peak the hooks cannot see in one go: what the forward saves outside the
   checkpointed layers, plus the layers' inputs the checkpoints keep (forward pre-hooks), plus the
   largest single layer's own saved tensors (measured in the same forward without checkpointing),
   which backward holds while it recomputes that layer.
3. Parameter / gradient / optimizer bytes of every rank under ddp, fsdp2, ZeRO-2 and ZeRO-3 on 2 CPU
   ranks (``_plan_worker.py``, one torchrun launch) equal the plan's, to the byte, with parameter
   widths that force FSDP2's and DeepSpeed's padding.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmtrain.cli import main
from vlmtrain.config import load_config, save_config
from vlmtrain.data.loader import StepBuilder
from vlmtrain.data.sampler import make_plan
from vlmtrain.features.source import FeatureSource
from vlmtrain.models.packed_attention import uses_varlen
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
from vlmtrain.tools.plan import backend_row, rank_memory, state_inputs
from vlmtrain.tools.plan_activations import activation_bytes
from vlmtrain.tools.plan_arch import model_spec
from vlmtrain.tools.plan_data import micro_shape, plan_model
from vlmtrain.tools.plan_measure import checkpointed_inputs, largest_layer, layer_names, saved_tensors_meter
from vlmtrain.train.build import build_batches, build_model_and_data, build_plan, run_flops

from _plan_worker import CASES  # noqa: E402  (tests/tools is on sys.path, as for tests/parallel's workers)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_plan_worker.py")
TOLERANCE = 0.15


def _plan_json(cfg, tmp_path: Path, *args: str, capsys) -> dict:
    path = tmp_path / "plan.yaml"
    save_config(cfg, path)
    capsys.readouterr()
    assert main(["plan", "--config", str(path), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


# -- 1. FLOPs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2])
def test_flops_per_step_equal_the_flops_model(tiny_cfg, tmp_path, capsys, world):
    report = _plan_json(tiny_cfg, tmp_path, "--gpus", str(world), "--mfu", "0.5", capsys=capsys)
    c = report["compute"]
    model, data = build_model_and_data(tiny_cfg, Path(tiny_cfg.output_dir))
    source = FeatureSource()
    flops = run_flops(model, source)
    builders = [StepBuilder(data.samples, data.frames, data.pad_id, data.image_id,
                            make_plan(tiny_cfg.data, tiny_cfg.train, data.samples, model.vision_patches_per_frame(),
                                      tiny_cfg.seed, world, rank, False, one_row=uses_varlen(model)))
                for rank in range(world)]
    steps = builders[0].plan.steps_per_epoch
    assert report["batch"]["steps_per_epoch"] == steps and c["steps_counted"] == steps
    real = []
    for k in range(steps):
        total = 0
        for build in builders:  # each rank's micro-batches, counted as StepMeter counts them
            micro = build(k)
            unique = sum(int(b.pixels.shape[0]) for b in micro)
            docs = [n for b in micro for row in b.doc_lengths for n in row]
            total += flops.step(docs, unique, unique, sum(b.num_label_tokens for b in micro))
        real.append(total)
    assert c["flops_per_step_by_step"] == real
    assert c["flops_per_step"] == round(sum(real) / steps)
    peak = report["hardware"]["peak_flops"]
    assert c["step_s"] == pytest.approx(sum(real) / steps / (world * peak * 0.5))
    assert c["total_s"] == pytest.approx(c["step_s"] * tiny_cfg.train.steps)
    assert report["batch"]["ranks"] == world and report["parameters"]["all"]["trainable"] == sum(
        p.numel() for p in model.parameters())


# -- 2. activations ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory) -> Path:
    return save_tiny_qwen_vl(tmp_path_factory.mktemp("plan") / "qwen2_5_vl", family="qwen2_5_vl", seed=0)


def _config(kind: str, tiny_cfg, qwen_path, qwen_lora_cfg, gridnav_root, tmp_path):
    if kind == "composed":
        cfg = tiny_cfg
    else:
        cfg = qwen_lora_cfg(qwen_path, gridnav_root, tmp_path / kind)
        cfg.model.lora = kind == "qwen_lora"
    cfg.features.cache = "off"
    return cfg


def _measure(model, batch, source, ckpt: bool) -> int:
    """Saved bytes of one forward (see the module docstring for the checkpointing case)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from vlmtrain.train.step import micro_loss

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    flags = [m.gradient_checkpointing for m in layers]
    for m in layers:
        m.gradient_checkpointing = False
    with saved_tensors_meter(model) as plain, checkpointed_inputs(model, every_layer=True) as inputs:
        loss, _ = micro_loss(model, batch, torch.device("cpu"), source)
    loss.backward()
    if not ckpt:
        return plain.total
    for m, f in zip(layers, flags):
        m.gradient_checkpointing = f
    on = [n for n, m in zip(layer_names(model), layers) if m.gradient_checkpointing]
    with saved_tensors_meter(model) as outside, checkpointed_inputs(model) as kept:
        loss, _ = micro_loss(model, batch, torch.device("cpu"), source)
    loss.backward()
    kept_bytes = sum(v for k, v in kept.items() if k not in outside.storages)
    return outside.total + kept_bytes + largest_layer(plain, on, set(inputs))


@pytest.mark.parametrize("kind,ckpt", [("composed", ()), ("composed", ("vision", "llm")),
                                       ("qwen_lora", ()), ("qwen_lora", ("llm",)),
                                       ("qwen_full", ()), ("qwen_full", ("vision", "llm"))])
def test_activation_estimate_within_15_percent(kind, ckpt, tiny_cfg, qwen_path, qwen_lora_cfg, gridnav_root,
                                               tmp_path):
    cfg = _config(kind, tiny_cfg, qwen_path, qwen_lora_cfg, gridnav_root, tmp_path)
    cfg.train.grad_checkpointing = list(ckpt)
    torch.manual_seed(0)
    model, data = build_model_and_data(cfg, Path(cfg.output_dir))
    source = FeatureSource()
    batches, _ = build_batches(cfg, data, model, source, 0, 1, plan=build_plan(cfg, data, model, False))
    batch = batches.next()[0]
    batches.close()
    model.train()
    measured = _measure(model, batch, source, bool(ckpt))
    estimate = activation_bytes(model_spec(model, ckpt), micro_shape(batch, uses_varlen(model)))["total"]
    print(f"{kind} ckpt={list(ckpt)}: estimate {estimate} B, measured {measured} B, ratio {estimate / measured:.4f}")
    assert abs(estimate / measured - 1) <= TOLERANCE
    # The plan derives the same micro-batch shape from the sample arrays, and builds the same spec on the meta device.
    meta, _ = plan_model(cfg)
    assert model_spec(meta, ckpt) == model_spec(model, ckpt)


def test_plan_micro_batches_are_the_real_ones(tiny_cfg):
    from vlmtrain.tools.plan_data import build_world_plan, plan_data, step_contents

    meta, _ = plan_model(tiny_cfg)
    data = plan_data(tiny_cfg, meta)
    contents = step_contents(build_world_plan(tiny_cfg, data, meta, 1, False), data, meta, 1, False)
    model, real = build_model_and_data(tiny_cfg, Path(tiny_cfg.output_dir))
    batches, _ = build_batches(tiny_cfg, real, model, FeatureSource(), 0, 3)
    got = [micro_shape(b, uses_varlen(model)) for _ in range(3) for b in batches.next()]
    batches.close()
    assert [dataclasses.replace(m, visual_tokens=0) for m in contents.micro[:3]] == [
        dataclasses.replace(m, visual_tokens=0) for m in got]


# -- 3. exact state bytes on 2 ranks ------------------------------------------------------------
@pytest.fixture(scope="session")
def deepspeed_extensions(request, tmp_path_factory) -> Path:
    """DeepSpeed's JIT-compiled ops, in the folder ``tests/parallel`` uses (see its conftest)."""
    pytest.importorskip("deepspeed")
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("deepspeed_torch_extensions")) if cache else tmp_path_factory.mktemp("torch_extensions")


@pytest.mark.slow
def test_state_bytes_exact_on_two_ranks(tiny_cfg, tmp_path, deepspeed_extensions):
    # Odd widths: FSDP2 pads dim-0 shards, DeepSpeed pads groups to 2 x world elements and partitions.
    cfg = load_config(tiny_cfg, None, ["model.vision_intermediate=63", "model.lm_intermediate=67",
                                       "train.threads=1"])
    path = tmp_path / "state.yaml"
    save_config(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(deepspeed_extensions)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), str(path), str(tmp_path / "out"), ",".join(CASES)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("rank*.json"))]
    assert proc.returncode == 0 and len(reports) == 2, (
        "\n".join(r["error"][-3000:] for r in reports) + proc.stderr[-4000:])
    rows = []
    for case, overrides in CASES.items():
        case_cfg = load_config(cfg, None, overrides)
        meta, _ = plan_model(case_cfg)  # the plan's own model, built on the meta device
        infos, groups, _ = state_inputs(case_cfg, meta)
        for report in reports:
            mem = rank_memory(backend_row(case_cfg.parallel), infos, groups, 2, report["rank"], case_cfg)
            want = {"parameters": mem.parameters, "gradients": mem.gradients, "optimizer": mem.optimizer}
            rows.append((case, report["rank"], report[case], want))
            print(f"{case} rank {report['rank']}: measured {report[case]} planned {want}")
    assert all(got == want for _, _, got, want in rows), [r for r in rows if r[2] != r[3]]


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_table_and_bad_inputs(tiny_cfg, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    save_config(tiny_cfg, path)
    assert main(["plan", "--config", str(path), "--gpus", "2", "--gpu", "a100-40"]) == 0
    out = capsys.readouterr().out
    for needle in ("parameters", "batch:", "per epoch", "FLOP per step", "memory per rank", "zero3", "fits 39.4 GiB",
                   "assumptions:", "MFU 0.35 assumed"):
        assert needle in out, needle
    for args, message in ((["--gpu", "tpu"], "--gpu tpu: unknown"), (["--gpus", "0"], "must be >= 1"),
                          (["--mfu", "1.5"], "--mfu 1.5"),
                          (["data.packing=false", "train.batch_size=15", "--gpus", "2"], "no step plan"),
                          (["optim.lrr=1"], "did you mean")):
        assert main(["plan", "--config", str(path), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("vlmtrain: ") and message in err[-1], err


def test_checkpointing_packed_documents_same_loss_and_grads(tiny_cfg):
    """Backward recomputes a checkpointed layer outside the forward's packed-document context; the
    layout is handed to the recomputation (``packed_attention.checkpoint_contexts``), so a varlen-packed
    micro-batch gives the same loss and gradients with checkpointing (without it: a CheckpointError)."""
    from vlmtrain.parallel.activation_checkpointing import apply_activation_checkpointing
    from vlmtrain.train.step import batch_loss

    torch.manual_seed(0)
    model, data = build_model_and_data(tiny_cfg, Path(tiny_cfg.output_dir))
    batches, _ = build_batches(tiny_cfg, data, model, FeatureSource(), 0, 1)
    batch = batches.next()[0]
    batches.close()
    assert batch.packed and uses_varlen(model)
    model.train()
    results = []
    for parts in ((), ("vision", "llm")):
        apply_activation_checkpointing(model, parts)
        model.zero_grad(set_to_none=True)
        loss = batch_loss(model, batch, torch.device("cpu"))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7)


def test_mfu_from_a_matching_bench_result(tiny_cfg, tmp_path, capsys):
    out = Path(tiny_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"mfu": 0.41, "machine": {"gpu": "NVIDIA H100 80GB HBM3"},
              "config": {"family": "composed", "packing": True, "precision": "fp32", "batch_size": 16, "grad_accum": 1}}
    (out / "bench.json").write_text(json.dumps(record))
    c = _plan_json(tiny_cfg, tmp_path, capsys=capsys)["compute"]
    assert c["mfu"] == 0.41 and "measured by vlmtrain bench" in c["mfu_source"]
    report = _plan_json(tiny_cfg, tmp_path, "--gpu", "a100", capsys=capsys)  # measured on another GPU
    assert report["compute"]["mfu"] == 0.35 and any("MFU 0.35 assumed" in a for a in report["assumptions"])
    record["config"]["batch_size"] = 32  # another config
    (out / "bench.json").write_text(json.dumps(record))
    assert "another config (batch_size)" in _plan_json(tiny_cfg, tmp_path, capsys=capsys)["compute"]["mfu_source"]
