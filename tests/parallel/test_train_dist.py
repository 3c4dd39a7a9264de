"""``vlmtrain train`` itself under torchrun (2 ranks, gloo, CPU) on the tiny GridNav preset.

For ddp and fsdp2: 5 steps on 2 ranks give the loss trajectory of one process on the same global
batch (16 samples: 8 per rank vs 16 in one), the per-rank metrics land in ``metrics.jsonl`` (rank 0
only), a resumed launch continues with the same losses and bitwise the same weights, and an FSDP2
(DCP) checkpoint of 2 ranks resumes in one process. DeepSpeed ZeRO-2 and ZeRO-3 the same on 2 ranks
(skipped without DeepSpeed); their launches share one folder of compiled ops (``conftest.py``), so
only the session's first compiles DeepSpeed's comm op (~60 s on 2 cores).

Tolerances (fp32): losses as logged (rounded to 1e-6) within ``LOSS_TOL``; final weights of 2 ranks
vs 1 process within ``WEIGHT_TOL`` (the same sums in another order, through 5 Adam steps; measured
1.3e-5 for ddp and ZeRO-2, 3.7e-5 for ZeRO-3; gradient norms differ by up to 5e-6 under ZeRO-3);
2 -> 1 resumed weights within 1e-5 (measured 3.5e-7); a resume on 2 ranks is bitwise. Each launch
costs ~10 s on 2 cores, mostly imports.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from vlmtrain.config import ConfigError, FeaturesConfig, ParallelConfig, RunConfig, load_config, save_config
from vlmtrain.parallel.init import DistInfo
from vlmtrain.presets import gridnav_tiny
from vlmtrain.parallel.deepspeed_engine import deepspeed_config_from
from vlmtrain.train.build import rank_features
from vlmtrain.train.loop import train

REPO = Path(__file__).resolve().parents[2]
STEPS, CKPT = 5, 3
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-4
DS_BUCKET = 20_000  # elements: several reduce / gather buckets per step for the tiny model
DS_FIRST_LAUNCH_TIMEOUT_S = 420  # the session's first DeepSpeed launch may compile its comm op
RANK_KEYS = ("time/step_s_max", "time/step_s_min", "time/data_wait_s_max", "time/data_wait_s_min",
             "memory/host_rss_gib_max", "memory/host_rss_gib_min", "memory/host_peak_rss_gib_max")


def run_config(gridnav_root: Path, out: Path) -> RunConfig:
    """The tiny preset: 5 steps of 16 samples, a metrics line every step, checkpoints at 3 and 5."""
    cfg = gridnav_tiny()
    cfg.data.root, cfg.data.gridnav_episodes, cfg.output_dir = str(gridnav_root), 0, str(out)
    cfg.train.progress, cfg.train.threads = False, 1
    cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every, cfg.train.keep_checkpoints = STEPS, 1, CKPT, 5
    # Padded steps: these tests compare 2 ranks with 1 process and resume across them, which needs the
    # same samples in step k whatever the world size. Packed steps are whole packs per rank (their
    # count per rank is rounded), so their composition depends on the world size (docs/distributed.md).
    cfg.data.packing = False
    return cfg


def torchrun_train(cfg: RunConfig, tmp: Path, *overrides: str, env: Optional[dict] = None, timeout: float = 240) -> str:
    """``torchrun --nproc_per_node 2 -m vlmtrain.cli train --config ...``; fails with the output tail,
    else returns the output."""
    path = tmp / f"{Path(cfg.output_dir).name}.yaml"
    save_config(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vlmtrain.cli",
           "train", "--config", str(path), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed (rc {proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss/train"] for m in metrics(run)}


def weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def interrupted_copy(run: Path, dest: Path) -> Path:
    """``run`` as if killed after its step-3 checkpoint: the step-5 checkpoint and outputs removed."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / f"step-{STEPS:07d}")
    shutil.rmtree(dest / "model")
    (dest / "summary.json").unlink()
    return dest


@pytest.fixture(scope="module")
def reference(gridnav_root, tmp_path_factory) -> Path:
    """One process, the same config and global batch."""
    cfg = run_config(gridnav_root, tmp_path_factory.mktemp("reference") / "run")
    train(cfg)
    return Path(cfg.output_dir)


def check_two_rank_run(run: Path, reference: Path) -> None:
    """Losses and grad norms of the 2-rank run equal one process's; only rank 0 wrote; per-rank keys."""
    got, ref = metrics(run), metrics(reference)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1)), "one metrics line per step, from rank 0 only"
    for g, r in zip(got, ref):
        assert abs(g["loss/train"] - r["loss/train"]) <= LOSS_TOL, (g["step"], g["loss/train"], r["loss/train"])
        assert abs(g["optim/grad_norm"] - r["optim/grad_norm"]) <= LOSS_TOL
        assert all(k in g for k in RANK_KEYS) and not any(k in r for k in RANK_KEYS)
        assert g["time/step_s_max"] >= g["time/step_s_min"] > 0
        # host memory of each rank (a torch + transformers process holds well over 100 MiB)
        assert g["memory/host_peak_rss_gib_max"] >= g["memory/host_rss_gib_max"] >= g["memory/host_rss_gib_min"] > 0.1
    assert got[-1]["loss/train"] < got[0]["loss/train"]
    assert weight_diff(run, reference) <= WEIGHT_TOL
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["samples"] == STEPS * 16  # both ranks' samples


def two_rank_run(backend: str, reference: Path, gridnav_root: Path, tmp_path: Path) -> tuple[RunConfig, Path]:
    """Train the tiny run on 2 ranks with ``backend`` and check it against the one-process reference."""
    cfg = run_config(gridnav_root, tmp_path / backend)
    cfg.parallel.backend = backend
    torchrun_train(cfg, tmp_path)
    run = Path(cfg.output_dir)
    check_two_rank_run(run, reference)
    return cfg, run


@pytest.mark.slow
def test_ddp_train_two_ranks_matches_one_process_and_resumes(reference, gridnav_root, tmp_path):
    cfg, run = two_rank_run("ddp", reference, gridnav_root, tmp_path)
    ckpt = run / "checkpoints" / f"step-{CKPT:07d}"  # the plain format, written by rank 0
    assert (ckpt / "trained.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert len(torch.load(ckpt / "rng-ranks.pt", weights_only=True)) == 2

    resumed = interrupted_copy(run, tmp_path / "ddp_resumed")
    cfg.output_dir, cfg.train.resume = str(resumed), True
    torchrun_train(cfg, tmp_path)
    assert losses(resumed) == losses(run)  # steps 4, 5 rewritten with the same values
    assert weight_diff(resumed, run) == 0.0


@pytest.mark.slow
def test_fsdp2_train_two_ranks_matches_one_process_and_resumes_on_two_and_one(reference, gridnav_root, tmp_path):
    cfg, run = two_rank_run("fsdp2", reference, gridnav_root, tmp_path)
    ckpt = run / "checkpoints" / f"step-{CKPT:07d}"  # DCP shards plus rank 0's trainer state
    assert (ckpt / "dcp" / ".metadata").exists() and not (ckpt / "trained.safetensors").exists()
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2

    on_two = interrupted_copy(run, tmp_path / "fsdp2_on_two")
    cfg.output_dir, cfg.train.resume = str(on_two), True
    torchrun_train(cfg, tmp_path)
    assert losses(on_two) == losses(run)
    assert weight_diff(on_two, run) == 0.0

    # The same checkpoint in one process (no torchrun: fsdp2 falls back to one unsharded process).
    on_one = interrupted_copy(run, tmp_path / "fsdp2_on_one")
    cfg.output_dir = str(on_one)
    summary = train(cfg)
    assert summary["world_size"] == 1
    got, want = losses(on_one), losses(run)
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= LOSS_TOL for s in got), (got, want)
    assert weight_diff(on_one, run) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_train_two_ranks_matches_one_process_and_resumes(stage, reference, gridnav_root, tmp_path,
                                                                    deepspeed_extensions):
    """ZeRO-2 / ZeRO-3 (every parameter partitioned, small buckets: several collectives per step)
    through ``vlmtrain train``: the 5 losses and gradient norms of one process, rank 0's metrics with
    the wall-clock breakdown, DeepSpeed's checkpoint at step 3 (``deepspeed/``), and a new launch
    resumed from it logs the same losses for steps 4-5 and ends with the same weights."""
    cfg = run_config(gridnav_root, tmp_path / f"zero{stage}")
    p = cfg.parallel
    p.backend, p.deepspeed_zero_stage, p.deepspeed_wall_clock_breakdown = "deepspeed", stage, True
    p.deepspeed_reduce_bucket_size = p.deepspeed_allgather_bucket_size = DS_BUCKET
    p.deepspeed_stage3_prefetch_bucket_size, p.deepspeed_stage3_param_persistence_threshold = DS_BUCKET, 0
    env = {"TORCH_EXTENSIONS_DIR": str(deepspeed_extensions)}
    t0 = time.perf_counter()
    torchrun_train(cfg, tmp_path, env=env, timeout=DS_FIRST_LAUNCH_TIMEOUT_S)
    train_s = time.perf_counter() - t0
    run = Path(cfg.output_dir)
    check_two_rank_run(run, reference)
    assert all(f"deepspeed/{name}_ms" in m for m in metrics(run) for name in ("fwd", "bwd", "step"))
    ckpt = run / "checkpoints" / f"step-{CKPT:07d}"
    assert (ckpt / "deepspeed" / "latest").read_text().strip() == "zero" and not (ckpt / "trained.safetensors").exists()
    assert len(list((ckpt / "deepspeed" / "zero").glob("*optim_states.pt"))) == 2  # one partition per rank
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert not (run / "torch_extensions").exists()  # TORCH_EXTENSIONS_DIR set: the shared folder is used

    resumed = interrupted_copy(run, tmp_path / f"zero{stage}_resumed")
    cfg.output_dir, cfg.train.resume = str(resumed), True
    t0 = time.perf_counter()
    torchrun_train(cfg, tmp_path, env=env, timeout=DS_FIRST_LAUNCH_TIMEOUT_S)
    print(f"zero{stage}: train launch {train_s:.1f} s, resume launch {time.perf_counter() - t0:.1f} s")
    assert losses(resumed) == losses(run)  # steps 4, 5 rewritten with the same values
    assert weight_diff(resumed, run) == 0.0


def test_deepspeed_feature_cache_and_launch_checks(tiny_cfg, caplog):
    """No torchrun: a clear error before any work. ZeRO-3 turns a feature cache off (``auto``, with a
    log line saying why) or refuses it (``on``); ZeRO-2 keeps the per-rank cache."""
    cfg = load_config(tiny_cfg, overrides=["parallel.backend=deepspeed"])
    with pytest.raises(ConfigError, match="needs a process group: launch with torchrun"):
        train(cfg)
    assert not (Path(tiny_cfg.output_dir) / "metrics.jsonl").exists()

    info = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), backend="gloo", is_main=False)
    zero3 = ParallelConfig(backend="deepspeed", deepspeed_zero_stage=3)
    out = Path(tiny_cfg.output_dir)
    with caplog.at_level(logging.INFO, logger="vlmtrain"):
        assert rank_features(FeaturesConfig(cache="auto"), zero3, info, out).cache == "off"
    assert "feature cache off: DeepSpeed ZeRO-3" in caplog.text
    with pytest.raises(ConfigError, match="features.cache=on cannot be used with parallel.deepspeed_zero_stage=3"):
        rank_features(FeaturesConfig(cache="on"), zero3, info, out)
    zero2 = rank_features(FeaturesConfig(cache="auto"), ParallelConfig(backend="deepspeed"), info, out)
    assert zero2.cache == "auto" and zero2.cache_dir == str(out / "feature_cache" / "rank-1")


def test_parallel_config_keys(tiny_cfg):
    cfg = load_config(tiny_cfg, overrides=["parallel.backend=deepspeed", "memory.empty_cache_reserved_gib=20",
                                           "parallel.deepspeed_zero_stage=3", "parallel.deepspeed_offload_param=cpu"])
    assert cfg.parallel.backend == "deepspeed" and cfg.memory.empty_cache_reserved_gib == 20
    assert (cfg.parallel.deepspeed_zero_stage, cfg.parallel.deepspeed_offload_param) == (3, "cpu")
    ds = deepspeed_config_from(cfg.parallel, bf16=False, grad_accum=2, grad_clip=0.5, micro_batch_size=4)
    settings = ds["zero_optimization"]
    assert settings["stage"] == 3 and settings["offload_param"]["device"] == "cpu"
    assert settings["reduce_bucket_size"] == 500_000_000 and settings["stage3_prefetch_bucket_size"] == 50_000_000
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"], ds["train_micro_batch_size_per_gpu"]) == (2, 0.5, 4)
    for bad, hint in (("parallel.backend=fsdp", "parallel.backend"), ("parallel.fsdp_shard_parts=[lm]", "unknown part"),
                      ("parallel.fsdp_mixed_precision=fp16", "fsdp_mixed_precision"),
                      ("parallel.backnd=ddp", "did you mean 'parallel.backend'"),
                      ("parallel.deepspeed_zero_stage=1", "deepspeed_zero_stage"),
                      ("parallel.deepspeed_offload_param=cpu", "needs parallel.deepspeed_zero_stage=3"),
                      ("parallel.deepspeed_offload_optimizer=nvme", "deepspeed_offload_optimizer"),
                      ("parallel.deepspeed_reduce_bucket_size=0", "must be > 0")):
        with pytest.raises(ConfigError, match=hint):
            load_config(tiny_cfg, overrides=[bad])


@pytest.mark.slow
def test_ddp_nan_on_one_rank_is_skipped_by_both(reference, gridnav_root, tmp_path):
    """A NaN loss on rank 1 only at step 3: both ranks skip that update (they decide from the loss
    summed over ranks), the run goes on in step, and its weights equal one process that skipped step 3."""
    from vlmtrain.train.guards import FAULT_ENV

    cfg = run_config(gridnav_root, tmp_path / "ddp_nan")
    cfg.parallel.backend = "ddp"
    torchrun_train(cfg, tmp_path, env={FAULT_ENV: "3@1"})
    run = Path(cfg.output_dir)
    got = metrics(run)
    assert [m["train/nonfinite_skipped"] for m in got] == [0, 0, 1, 0, 0]
    assert json.loads((run / "summary.json").read_text())["nonfinite_skipped"] == 1
    one = run_config(gridnav_root, tmp_path / "one_nan")
    os.environ[FAULT_ENV] = "3"
    try:
        train(one)
    finally:
        del os.environ[FAULT_ENV]
    assert weight_diff(run, Path(one.output_dir)) <= WEIGHT_TOL
    assert weight_diff(run, reference) > WEIGHT_TOL  # the skipped update is really missing
