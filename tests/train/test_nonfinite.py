"""The non-finite guard: an injected NaN step is skipped (no update, counted) or stops the run naming
the step and its samples, on every rank together; no checkpoint ever holds a non-finite value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmtrain.config import save_config
from vlmtrain.errors import NonFiniteError
from vlmtrain.train.build import build_model_and_data
from vlmtrain.train.checkpoint import save_run_checkpoint
from vlmtrain.train.guards import FAULT_ENV, fault_steps
from vlmtrain.train.loop import train
from vlmtrain.train.optim import build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parents[2]


def _all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(path).values())


def _metrics(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_fault_spec_parses_steps_and_ranks():
    assert fault_steps(0, "4, 9,12@1") == {4, 9}
    assert fault_steps(1, "4, 9,12@1") == {4, 9, 12}
    assert fault_steps(0, "") == frozenset()
    with pytest.raises(ValueError, match="not STEP or STEP@RANK"):
        fault_steps(0, "four")


def test_skip_drops_the_update_counts_it_and_training_goes_on(tiny_cfg, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "4,5")
    tiny_cfg.train.steps, tiny_cfg.train.log_every = 10, 1
    tiny_cfg.train.ckpt_every, tiny_cfg.train.keep_checkpoints = 1, 20
    summary = train(tiny_cfg)
    out = Path(tiny_cfg.output_dir)
    lines = _metrics(out)
    assert [s for s, m in lines.items() if m["train/nonfinite_skipped"]] == [4, 5]
    assert "loss/train" not in lines[4] and "optim/grad_norm" not in lines[5]  # no NaN in metrics.jsonl
    assert all(torch.isfinite(torch.tensor(m["loss/train"])) for s, m in lines.items() if s not in (4, 5))
    assert summary["nonfinite_skipped"] == 2
    ckpts = out / "checkpoints"
    weights = {s: load_file(ckpts / f"step-{s:07d}" / "trained.safetensors") for s in (3, 4, 5, 6)}
    # Steps 4 and 5 changed nothing (no AdamW step, no weight decay), step 6 trained again.
    assert all(torch.equal(weights[3][k], weights[5][k]) for k in weights[3])
    assert any(not torch.equal(weights[5][k], weights[6][k]) for k in weights[5])
    assert all(_all_finite(p / "trained.safetensors") for p in ckpts.iterdir())
    assert _all_finite(out / "model" / "model.safetensors")
    # The skipped count survives a resume (it is part of the checkpoint's trainer state).
    assert json.loads((ckpts / "step-0000006" / "trainer_state.json").read_text())["nonfinite_skipped"] == 2


def test_stop_names_step_and_samples_in_one_line_and_keeps_finite_checkpoints(tiny_cfg, tmp_path):
    tiny_cfg.train.steps, tiny_cfg.train.ckpt_every, tiny_cfg.train.keep_checkpoints = 8, 2, 10
    tiny_cfg.train.on_nonfinite, tiny_cfg.train.record_samples = "stop", True
    save_config(tiny_cfg, tmp_path / "run.yaml")
    env = dict(os.environ, **{FAULT_ENV: "5", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-m", "vlmtrain.cli", "train", "--config", str(tmp_path / "run.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("vlmtrain: training stopped: step 5: non-finite loss nan"), line
    recorded = json.loads((Path(tiny_cfg.output_dir) / "samples.jsonl").read_text().splitlines()[4])
    assert recorded["step"] == 5 and f"samples {recorded['sample_ids'][:32]}" in line
    ckpts = Path(tiny_cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004"]
    assert all(_all_finite(p / "trained.safetensors") for p in ckpts.iterdir())
    assert not (Path(tiny_cfg.output_dir) / "model").exists()


def test_a_checkpoint_is_never_written_from_nonfinite_weights(tiny_cfg, tmp_path):
    model, _ = build_model_and_data(tiny_cfg, Path(tiny_cfg.output_dir))
    optimizer = build_optimizer(model, tiny_cfg.optim)
    scheduler = build_scheduler(optimizer, tiny_cfg.optim, 10)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match=f"step 3: trainable weights hold NaN/Inf \\({name}"):
        save_run_checkpoint(tmp_path / "ckpts", 3, model, optimizer, scheduler, {"totals": {}}, 2)
    assert not (tmp_path / "ckpts").exists() or not any((tmp_path / "ckpts").iterdir())


def test_sigterm_checkpoints_the_step_reached_exits_0_and_resume_matches(tiny_cfg, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint of that step is written, exit code 0, no final
    model; the resumed run ends bitwise equal to an uninterrupted one. Default settings (torch's thread
    count): a CPU run is bitwise reproducible (``tests/train/test_determinism.py``)."""
    import signal
    import time

    tiny_cfg.train.steps, tiny_cfg.train.log_every, tiny_cfg.train.ckpt_every = 40, 1, 0
    save_config(tiny_cfg, tmp_path / "run.yaml")
    cmd = [sys.executable, "-m", "vlmtrain.cli", "train", "--config", str(tmp_path / "run.yaml")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = Path(tiny_cfg.output_dir)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 5"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = json.loads((out / "summary.json").read_text())["preempted_at_step"]
    assert 5 <= stopped < 40 and f"SIGTERM: stopped after step {stopped}" in stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{stopped:07d}"]
    assert not (out / "model").exists()
    resumed = subprocess.run(cmd + ["train.resume=true"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ref = tiny_cfg
    ref.output_dir = str(tmp_path / "ref")
    train(ref)
    a = load_file(Path(ref.output_dir) / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
