"""vlmtrain.parallel.deepspeed_engine: DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU ranks (gloo, torchrun).

The multi-rank checks live in ``_ds_worker.py``; it is launched twice per session (``train``: all
cases 5 steps and a checkpoint after step 3; ``resume``: a fresh launch that loads it and runs steps
4-5), and these tests read the ranks' JSON reports. DeepSpeed JIT-compiles a shared-memory comm op on
first use (~60 s on 2 cores): it goes to the ``deepspeed_extensions`` folder (``conftest.py``: pytest's
cache, or one temporary folder per session under ``-p no:cacheprovider``; never ``~/.cache``), shared
with ``test_train_dist.py``, so only the first launch pays for it. Skipped without DeepSpeed (the
``deepspeed`` extra); the config tests at the bottom need no DeepSpeed.

Tolerances (fp32): per-step losses and gradient norms within 1e-5 of one process on the
concatenated global batch (measured 6e-7 / 1e-7); weights within 0.1 * lr (Adam amplifies the
summation noise on exactly-zero gradients, measured 1.5e-4); resumed losses and weights within 1e-6
of the uninterrupted run (measured 0: bitwise); bf16 losses within 1e-2 of the fp32 reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmtrain.parallel.deepspeed_engine import deepspeed_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_ds_worker.py")
FIRST_LAUNCH_TIMEOUT_S = 420  # includes compiling DeepSpeed's comm op in a fresh checkout
TIMEOUT_S = 180
STAGES = {"zero2": ("zero2",), "zero3": ("zero3", "zero3_offload")}


def launch(phase: str, out: Path, extensions: Path, timeout: float) -> tuple[list[dict], float]:
    """Run the worker on 2 ranks: both ranks' JSON reports and the wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(extensions)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), phase, str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    detail = "\n".join(f"rank {i}: {r['failures']} {r['error'][-2000:]}" for i, r in enumerate(reports))
    assert proc.returncode == 0, f"{phase} worker failed (rc {proc.returncode})\n{detail}\n{proc.stderr[-4000:]}"
    assert len(reports) == 2 and all(r["ok"] for r in reports), detail
    return reports, wall


@pytest.fixture(scope="module")
def runs(tmp_path_factory, deepspeed_extensions) -> dict[str, dict]:
    """Rank 0's values of the train and the resume launch (each fails here with the workers' output)."""
    root = tmp_path_factory.mktemp("deepspeed")
    (train, _), train_s = launch("train", root / "train", deepspeed_extensions, FIRST_LAUNCH_TIMEOUT_S)
    (resume, _), resume_s = launch("resume", root / "resume", deepspeed_extensions, TIMEOUT_S)
    print(f"deepspeed launches: train {train_s:.1f} s, resume {resume_s:.1f} s")
    return {"train": train["values"], "resume": resume["values"]}


def _max_abs(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_zero_matches_single_process(runs, stage):
    """5 steps x 2 micro-batches on 2 ranks (AdamW, warmup, active clipping, small buckets, ZeRO-3
    with every parameter partitioned; with CPU offload too) = one process on the global batch."""
    v = runs["train"]
    for case in STAGES[stage]:
        assert len(v[f"{case}/train_losses"]) == 5
        assert v[f"{case}/loss_vs_single_process"] <= 1e-5, case
        assert v[f"{case}/grad_norm_vs_single_process"] <= 1e-5, case
        assert v[f"{case}/weights_vs_single_process"] <= 1e-3, case
        assert v[f"{case}/clipping_active"] > 0 and v[f"{case}/learns"] > 0, case
        assert v[f"{case}/wall_clock_breakdown_keys"] >= 3, case


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_zero_rank_without_images(runs, stage):
    """Rank 1 has no frame in step 2, rank 0 none in step 4 (after the resume): no hang, no collective
    mismatch, and those steps' losses still equal the single-process reference."""
    v = runs["train"]
    for case in STAGES[stage]:
        losses, ref = v[f"{case}/train_losses"], v[f"{case}/reference_losses"]
        assert abs(losses[1] - ref[1]) <= 1e-5 and abs(losses[3] - ref[3]) <= 1e-5, case
        assert len(runs["resume"][f"{case}/resume_losses"]) == 2, case


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_zero_save_resume_continues_identically(runs, stage):
    """Checkpoint after step 3 (weights, optimizer, scheduler, client state); a fresh launch loads it
    and steps 4-5 give the same losses and weights as the uninterrupted run."""
    t, r = runs["train"], runs["resume"]
    for case in STAGES[stage]:
        assert r[f"{case}/client_state_step"] == 0, case
        assert _max_abs(r[f"{case}/resume_losses"], t[f"{case}/train_losses"][3:]) <= 1e-6, case
        assert r[f"{case}/resumed_weights_vs_uninterrupted"] <= 1e-6, case


@pytest.mark.slow
def test_zero3_bf16_runs_learns_and_resumes(runs):
    t, r = runs["train"], runs["resume"]
    assert t["zero3_bf16/loss_vs_fp32_single_process"] <= 1e-2 and t["zero3_bf16/learns"] > 0
    assert r["zero3_bf16/resumed_weights_vs_uninterrupted"] <= 1e-6


# -- the config dict (no DeepSpeed needed) ------------------------------------------------------
def test_deepspeed_config_stage2_keys():
    cfg = deepspeed_config(stage=2, reduce_bucket_size=3e6, allgather_bucket_size=2e6, offload_optimizer="cpu",
                           grad_accum=2, micro_batch_size=4, grad_clip=0.0, bf16=False)
    zero = cfg["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (3_000_000, 2_000_000)
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # the loop's torch AdamW may run offloaded
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (4, 2)
    assert cfg["gradient_clipping"] == 0.0 and cfg["bf16"] == {"enabled": False}
    assert "allgather_bucket_size" not in deepspeed_config(stage=3)["zero_optimization"]
    with pytest.raises(ValueError, match="allgather_bucket_size"):
        deepspeed_config(allgather_bucket_size=0)
    with pytest.raises(ValueError, match="offload_optimizer"):
        deepspeed_config(offload_optimizer="nvme")


def test_build_engine_without_process_group_names_torchrun():
    pytest.importorskip("deepspeed")
    import torch

    from test_dist import tiny_composed
    from vlmtrain.parallel.deepspeed_engine import build_engine

    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this test process")
    model = tiny_composed()
    with pytest.raises(RuntimeError, match="torchrun"):
        build_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), deepspeed_config(bf16=False))
