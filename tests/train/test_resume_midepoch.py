"""Mid-epoch resume: a run SIGKILLed after a mid-epoch checkpoint and resumed consumes exactly the
samples the uninterrupted run consumes from that step on, and ends with bitwise equal weights; and the
loader-process path (``data.workers > 0``, frames decoded lazily) builds the same batches as the
preloaded-frames path."""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmtrain.config import save_config
from vlmtrain.data.frames import LazyFrames
from vlmtrain.data.loader import EpochPlan
from vlmtrain.train.checkpoint import latest_checkpoint

STEPS, CKPT_EVERY, BATCH = 30, 5, 16  # ~217 samples: 12-13 steps per epoch, every checkpoint mid-epoch
KILL_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """6 GridNav episodes (~217 decision samples): an epoch is a dozen steps of 16."""
    from vlmtrain.envs.gridnav.generate import write_dataset

    return write_dataset(tmp_path_factory.mktemp("gridnav6") / "train", episodes=6, seed=0, workers=1)



def run_cfg(root: Path, out: Path, packing: bool, workers: int):
    from vlmtrain.presets import gridnav_tiny

    cfg = gridnav_tiny()
    cfg.data.root, cfg.data.gridnav_episodes = str(root), 0
    cfg.data.packing, cfg.data.workers = packing, workers
    if packing:  # episode-grouped packs (an option): their resume is exact too
        cfg.data.episode_group = 4
    cfg.data.max_pack_tokens, cfg.data.max_pack_vision = 64, 96  # ~2 samples per pack, both budgets bind
    cfg.train.steps, cfg.train.ckpt_every, cfg.train.keep_checkpoints = STEPS, CKPT_EVERY, 100
    cfg.train.batch_size, cfg.train.log_every = BATCH, 1  # torch's default threads, as a user runs
    cfg.train.record_samples, cfg.train.progress = True, False
    cfg.output_dir = str(out)
    return cfg


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def start_and_kill_after_first_checkpoint(cfg, cfg_path: Path) -> tuple[subprocess.Popen, threading.Thread]:
    """Start ``vlmtrain train`` and a watcher that SIGKILLs it as soon as its first checkpoint exists."""
    save_config(cfg, cfg_path)
    proc = subprocess.Popen([sys.executable, "-m", "vlmtrain.cli", "train", "--config", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpts = Path(cfg.output_dir) / "checkpoints"

    def watch():
        deadline = time.time() + KILL_TIMEOUT_S
        while proc.poll() is None and time.time() < deadline:
            if ckpts.exists() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
                proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return proc, watcher


@pytest.mark.slow
@pytest.mark.parametrize("packing,workers", [(True, 0), (False, 0), (True, 1)],
                         ids=["packed", "padded", "packed-workers1"])
def test_sigkill_mid_epoch_resume_consumes_exactly_the_remaining_samples(small_root, tmp_path, packing, workers,
                                                                         caplog):
    from vlmtrain.train.loop import train

    killed_cfg = run_cfg(small_root, tmp_path / "killed", packing, workers)
    proc, watcher = start_and_kill_after_first_checkpoint(killed_cfg, tmp_path / "killed.yaml")
    # The uninterrupted reference runs in this process while the other one starts up.
    ref = train(run_cfg(small_root, tmp_path / "ref", packing, workers))
    watcher.join(KILL_TIMEOUT_S)
    out = proc.communicate(timeout=KILL_TIMEOUT_S)[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"run was not killed (rc {proc.returncode}):\n{out[-3000:]}"
    killed = tmp_path / "killed"
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"

    ckpt = latest_checkpoint(killed / "checkpoints")
    resume_step = int(ckpt.name.split("-")[1])
    before = jsonl(killed / "samples.jsonl")
    logged = max(line["step"] for line in before)
    assert [line["step"] for line in before] == list(range(1, logged + 1)) and logged >= resume_step
    # A line the checkpoint does not cover (the killed run trains on past it): resume must drop it.
    with open(killed / "samples.jsonl", "a") as fh:
        fh.write(json.dumps({"step": logged + 1, "sample_ids": [-1]}) + "\n")

    ref_samples = jsonl(tmp_path / "ref" / "samples.jsonl")
    ref_metrics = jsonl(tmp_path / "ref" / "metrics.jsonl")
    spe = round(ref_metrics[0]["step"] / ref_metrics[0]["train/epoch"])  # steps per epoch
    assert 0 < resume_step < STEPS and resume_step % spe, f"checkpoint {resume_step} is not mid-epoch ({spe}/epoch)"
    assert STEPS > 2 * spe  # the resumed run crosses an epoch boundary
    print(f"killed after step {logged}, resuming at checkpoint {resume_step} ({spe} steps per epoch)")

    caplog.set_level(logging.INFO, logger="vlmtrain")
    killed_cfg.train.resume = True
    train(killed_cfg)
    assert re.search(rf"resumed from .*step-0*{resume_step} at step {resume_step}\b", caplog.text), caplog.text

    after = jsonl(killed / "samples.jsonl")
    steps = [line["step"] for line in after]
    assert steps == list(range(1, STEPS + 1)), "samples.jsonl not truncated at the checkpoint"
    assert after[:resume_step] == before[:resume_step]  # the killed run's steps up to its checkpoint are kept
    # The resumed run's steps are the uninterrupted run's remaining steps: same samples, same order.
    assert after[resume_step:] == ref_samples[resume_step:]
    assert after == ref_samples
    ids = [line["sample_ids"] for line in after]
    for epoch in range(STEPS // spe):  # no sample replayed or skipped within an epoch
        seen = [i for step in ids[epoch * spe:(epoch + 1) * spe] for i in step]
        assert len(seen) == len(set(seen)), f"a sample repeats in epoch {epoch}"
        if not packing:
            assert seen == EpochPlan(ref["data"]["samples"], BATCH, killed_cfg.seed).order(epoch)[:spe * BATCH].tolist()

    steps = [line["step"] for line in jsonl(killed / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))
    a = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_loader_processes_build_the_preloaded_batches(small_root, tmp_path, packing, one_thread):
    """``data.workers=1``: steps built in a DataLoader process from lazily decoded JPEGs equal the steps
    built on a thread from the frames decoded at start, field by field, from a mid-run start step."""
    from vlmtrain.features.source import FeatureSource
    from vlmtrain.train.build import build_batches, build_model_and_data

    runs = {}
    for workers in (0, 1):
        cfg = run_cfg(small_root, tmp_path, packing, workers)
        cfg.train.grad_accum = 2
        model, data = build_model_and_data(cfg, Path(cfg.output_dir))
        assert isinstance(data.frames, LazyFrames) == (workers > 0)
        runs[workers] = build_batches(cfg, data, model, FeatureSource(), 7, 11)
    (threaded, plan0), (forked, plan1) = runs[0], runs[1]
    assert forked._loader is not None and threaded._loader is None
    assert plan0.steps_per_epoch == plan1.steps_per_epoch
    for k in range(7, 11):
        a, b = threaded.next(), forked.next()
        assert len(a) == len(b) == 2
        assert [i for m in a for i in m.sample_ids] == [i for s in plan0.step(k).micro for r in s for i in r]
        for x, y in zip(a, b):
            assert x.sample_ids == y.sample_ids and x.doc_lengths == y.doc_lengths and x.packed == y.packed == packing
            assert (x.step_label_tokens, x.num_label_tokens) == (y.step_label_tokens, y.num_label_tokens)
            assert x.pixels.dtype == y.pixels.dtype == torch.uint8 and x.pixels.float().std() > 0
            for name in ("input_ids", "labels", "attention_mask", "pixels", "slot_frames", "slot_age", "position_ids"):
                u, v = getattr(x, name), getattr(y, name)
                assert (u is None and v is None) or torch.equal(u, v), (k, name)
    with pytest.raises(StopIteration):
        forked.next()
    threaded.close()
    forked.close()
    assert not multiprocessing.active_children(), "close() left loader processes running"
