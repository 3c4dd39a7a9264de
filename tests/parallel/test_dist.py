"""vlmtrain.parallel: 2-rank DDP / FSDP2 runs under torchrun (gloo, CPU) and in-process unit tests.

The multi-rank checks live in ``_worker.py`` (launched once per mode); each rank writes its measured
differences to JSON, which these tests read so a failure names the check and its value.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmtrain.config import ModelConfig
from vlmtrain.parallel.init import (
    DistInfo, all_reduce_max, all_reduce_sum, broadcast_object, get_logger, init_distributed, print0,
)
from vlmtrain.parallel.memory import (
    DEFAULT_ALLOC_CONF, SyncedEmptyCache, configure_allocator, memory_stats, memory_stats_over_ranks,
)
from vlmtrain.parallel.parallelize import (
    StepRoot, accumulation_context, parallelize, transformer_blocks, unwrap,
)
from vlmtrain.config_parallel import ParallelConfig
from vlmtrain.models.composed import build_composed_vlm
from vlmtrain.models.composed_chat import train_tokenizer
from vlmtrain.features.source import dummy_frame_features
from vlmtrain.parallel.deepspeed_engine import deepspeed_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_worker.py")
TIMEOUT_S = 120
TOL = 1e-5
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="none", is_main=True)


def tiny_composed():
    """The worker's tiny composed VLM (2 SigLIP blocks, 2 Llama blocks)."""
    mcfg = ModelConfig(vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64, patch_size=4,
                       pixel_shuffle=2, lm_hidden=32, lm_layers=2, lm_heads=2, lm_kv_heads=2, lm_intermediate=64,
                       max_position=64)
    tok = train_tokenizer([" ".join(f"word{i}" for i in range(300))], vocab_size=64)
    assert len(tok) == 64
    torch.manual_seed(0)
    return build_composed_vlm(mcfg, image_size=16, tokenizer=tok, max_frame_slots=3)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """A tiny random Qwen2.5-VL behind its adapter."""
    from vlmtrain.models.qwen_vl import load_qwen_vl
    from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl

    return load_qwen_vl(save_tiny_qwen_vl(tmp_path_factory.mktemp("qwen25"), family="qwen2_5_vl"))


# -- multi-rank (torchrun, 2 processes, gloo) ----------------------------------------------------
def launch(mode: str, out: Path) -> list[dict]:
    """Run the worker on 2 ranks; both ranks' JSON reports (fails with the output tail if it crashed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), mode, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    detail = "\n".join(f"rank {i}: {r['failures']} {r['error'][-2000:]}" for i, r in enumerate(reports))
    assert proc.returncode == 0, f"{mode} worker failed (rc {proc.returncode})\n{detail}\n{proc.stderr[-4000:]}"
    assert len(reports) == 2 and all(r["ok"] for r in reports), detail
    return reports


# ~14 s each on 2 CPU cores (mostly 3 interpreters importing torch + transformers), so these two carry
# the slow marker; the in-process tests below stay in quick runs.
@pytest.mark.slow
def test_ddp_two_ranks(tmp_path):
    """Through the real ``train_step``: (a) per-rank data -> identical weights on both ranks, equal to
    one process on the concatenated batch (token-weighted loss, gradient norms and clipping too);
    (b) with 2 micro-batches per step DDP all-reduces once per step (no_sync), as with 1; (d) a rank
    without frames (vision trained or frozen) neither hangs nor changes the result."""
    rank0, rank1 = launch("ddp", tmp_path)
    v = rank0["values"]
    for case in ("ddp", "ddp_accum", "ddp_text_only_rank", "ddp_text_only_rank_frozen_vision"):
        assert v[f"{case}/vs_single_process"] <= TOL and v[f"{case}/loss_vs_single_process"] <= TOL, case
        assert v[f"{case}/grad_norm_vs_single_process"] <= TOL and v[f"{case}/clipping_active"] > 0, case
        assert v[f"{case}/moved"] > 1e-3 and v[f"{case}/differs_from_rank0_alone"] > 1e-4, case
        assert v[f"{case}/ranks_agree"] == 0.0 and rank1["values"][f"{case}/ranks_agree"] == 0.0, case
    assert v["ddp/syncs"] > 0 and v["ddp_accum/syncs"] == v["ddp/syncs"]
    assert all(rank1["values"][k] == 0 for k in rank1["values"] if k.startswith("helpers/"))


@pytest.mark.slow
def test_fsdp2_two_ranks(tmp_path):
    """(c) FSDP2 fp32, sharded per vision/LM block, through the real ``train_step``: 3 steps equal the
    single-process reference (weights gathered with get_model_state_dict(full_state_dict=True));
    (d) a rank without frames; bf16 mixed precision runs and learns."""
    rank0, _ = launch("fsdp2", tmp_path)
    v = rank0["values"]
    assert v["fsdp2/blocks_found"] == 0 and v["fsdp2/sharded_modules"] == 0
    for case in ("fsdp2", "fsdp2_accum", "fsdp2_text_only_rank", "fsdp2_text_only_rank_frozen_vision"):
        assert v[f"{case}/vs_single_process"] <= TOL and v[f"{case}/loss_vs_single_process"] <= TOL, case
        assert v[f"{case}/grad_norm_vs_single_process"] <= TOL and v[f"{case}/clipping_active"] > 0, case
        assert v[f"{case}/moved"] > 1e-3 and v[f"{case}/differs_from_rank0_alone"] > 1e-4, case
    assert v["fsdp2_bf16/moved"] > 1e-3 and v["fsdp2_bf16/loss_finite"] == 0.0


# -- init.py in one process ----------------------------------------------------------------------
def test_single_process_without_torchrun(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.backend, info.is_main, info.distributed) == (0, 1, "none", True, False)
    assert all_reduce_sum(2.5) == 2.5 and all_reduce_max(7) == 7.0
    payload = {"plan": [1, 2]}
    assert broadcast_object(payload) is payload
    print0("hello from rank 0")
    assert "hello from rank 0" in capsys.readouterr().out
    assert get_logger(info) is logging.getLogger("vlmtrain")


def test_non_zero_rank_gets_null_logger(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    other = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), backend="gloo", is_main=False)
    logger = get_logger(other)
    assert logger.disabled and not logger.propagate
    logger.error("must not appear")
    print0("must not appear either")
    assert capsys.readouterr() == ("", "")


# -- memory.py on CPU ----------------------------------------------------------------------------
def test_memory_functions_on_cpu_are_empty_and_safe():
    assert memory_stats("cpu") == {} and memory_stats(torch.device("cpu"), reset=False) == {}
    if not torch.cuda.is_available():
        assert memory_stats("cuda") == {}  # asked for CUDA on a machine without it: guarded
    assert memory_stats_over_ranks({}) == {}
    cache = SyncedEmptyCache(threshold_gib=1.0)
    assert cache("cpu") is False and cache.metrics() == {"memory/empty_cache_calls": 0.0}
    assert SyncedEmptyCache(enabled=False).metrics() == {}


def test_configure_allocator_sets_default_and_respects_user(monkeypatch):
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    decided = configure_allocator()
    assert decided.set_by == "vlmtrain" and os.environ["PYTORCH_CUDA_ALLOC_CONF"] == DEFAULT_ALLOC_CONF

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    decided = configure_allocator()
    assert (decided.set_by, decided.value) == ("user", "max_split_size_mb:128")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.8")  # the newer name
    decided = configure_allocator()
    assert (decided.variable, decided.set_by) == ("PYTORCH_ALLOC_CONF", "user")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


# -- parallelize.py in one process ---------------------------------------------------------------
def test_deepspeed_config_stage3_offload():
    cfg = deepspeed_config(stage=3, offload_optimizer="cpu", offload_param="cpu", reduce_bucket_size=2e8,
                           stage3_prefetch_bucket_size=1e7, stage3_param_persistence_threshold=1e4,
                           overlap_comm=False, wall_clock_breakdown=True, bf16=True, grad_accum=4, grad_clip=0.5)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is False
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (200_000_000, 10_000_000, 10_000)
    assert all(isinstance(zero[k], int) for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size"))
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 0.5
    assert cfg["wall_clock_breakdown"] is True
    json.dumps(cfg)  # DeepSpeed also reads configs from JSON files

    stage2 = deepspeed_config(stage=2)["zero_optimization"]
    assert "offload_param" not in stage2 and "offload_optimizer" not in stage2
    assert not any(k.startswith("stage3_") for k in stage2)
    with pytest.raises(ValueError, match="stage 3"):
        deepspeed_config(stage=2, offload_param="cpu")
    with pytest.raises(ValueError, match="stage"):
        deepspeed_config(stage=1)


def test_deepspeed_backend_names_the_extra_when_missing():
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"vlmtrain\[deepspeed\]"):
        parallelize(tiny_composed(), ParallelConfig(backend="deepspeed"), CPU, deepspeed=deepspeed_config(bf16=False),
                    optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(ValueError, match="bf16"):
        parallelize(tiny_composed(), ParallelConfig(backend="deepspeed"), CPU, deepspeed=deepspeed_config(bf16=True))


def test_transformer_blocks_of_composed_model():
    model = tiny_composed()
    blocks = transformer_blocks(model)
    assert set(blocks) == {"vision", "llm"}
    assert blocks["vision"] == list(model.vision.encoder.layers)  # transformers 5: no .vision_model level
    assert blocks["llm"] == list(model.lm.model.layers)
    assert transformer_blocks(StepRoot(model))["llm"] == blocks["llm"]  # through the wrapper too


def test_transformer_blocks_of_hf_qwen25_vl(tiny_qwen):
    blocks = transformer_blocks(tiny_qwen)
    cfg = tiny_qwen.hf.config
    assert set(blocks) == {"vision", "llm"}
    assert blocks["vision"] == list(tiny_qwen.hf.model.visual.blocks)
    assert blocks["llm"] == list(tiny_qwen.hf.model.language_model.layers)
    assert len(blocks["vision"]) == cfg.vision_config.depth and len(blocks["llm"]) == cfg.text_config.num_hidden_layers


def test_parallelize_without_process_group_is_the_plain_model():
    model = tiny_composed()
    parallel = parallelize(model, ParallelConfig(backend="ddp"), CPU)  # no torchrun: falls back to the root wrapper
    assert isinstance(parallel, StepRoot) and unwrap(parallel) is model
    assert isinstance(accumulation_context(parallel, is_last_micro=False), contextlib.nullcontext)
    ids = torch.randint(8, 64, (1, 8))
    loss = parallel(lambda m, x: m.forward_lm(m.lm.get_input_embeddings()(x), x), ids)
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="backend"):
        parallelize(model, ParallelConfig(backend="fsdp"), CPU)


def _image_params(model) -> dict:
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and model.part_of(n) in ("vision", "projector")}


def test_dummy_frame_features_keep_the_loss_and_reach_every_image_parameter():
    """A micro-batch without frames: a black frame's features passed to ``embed`` with the empty slot
    list leave the loss bitwise unchanged, and every trainable vision/projector parameter (the
    composed model's frame-age embedding too) gets a gradient of exactly zero: the graph has the shape
    of a micro-batch with frames, as DDP, FSDP2 and ZeRO need."""
    model = tiny_composed()
    ids = torch.randint(8, 64, (2, 10))
    no_slot = torch.zeros(0, dtype=torch.long)
    plain = model.forward_lm(model.embed(ids, torch.zeros(0, 4, model.projector.out_dim), no_slot, no_slot), ids)
    dummy = dummy_frame_features(model, torch.device("cpu"))
    assert dummy.shape == (1, 4, model.projector.out_dim)
    loss = model.forward_lm(model.embed(ids, dummy, no_slot, no_slot), ids)
    assert torch.equal(plain, loss)
    loss.backward()
    image_params = _image_params(model)
    assert "frame_age.weight" in image_params and "vision.embeddings.patch_embedding.weight" in image_params
    assert all(p.grad is not None for p in image_params.values()), \
        [n for n, p in image_params.items() if p.grad is None]
    assert all(float(p.grad.abs().max()) == 0.0 for p in image_params.values())


def test_dummy_frame_features_on_hf_adapter(tiny_qwen):
    tiny_qwen.zero_grad(set_to_none=True)
    ids = torch.randint(10, 100, (1, 6))
    dummy = dummy_frame_features(tiny_qwen, torch.device("cpu"))
    embeds = tiny_qwen.embed(ids, dummy, torch.zeros(0, dtype=torch.long))
    assert torch.equal(embeds, tiny_qwen.hf.get_input_embeddings()(ids))
    embeds.sum().backward()
    visual = [p for p in tiny_qwen.hf.model.visual.parameters() if p.requires_grad]
    assert visual and all(p.grad is not None and float(p.grad.abs().max()) == 0.0 for p in visual)
