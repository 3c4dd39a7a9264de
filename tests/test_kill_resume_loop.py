"""scripts/kill_resume_loop.py on the tiny preset: SIGKILLs at a random time, during a checkpoint write
and right after one, each resumed, end bitwise equal to the uninterrupted run (default settings)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_resume_loop.py"


def _load():
    spec = importlib.util.spec_from_file_location("kill_resume_loop", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_kills_at_every_moment_resume_to_the_uninterrupted_weights(gridnav_root, tmp_path, capsys):
    loop = _load()
    args = ["--preset", "gridnav_tiny", f"data.root={gridnav_root}", "data.gridnav_episodes=0",
            "train.steps=40", "train.ckpt_every=4"]
    rc = loop.main(["--kills", "3", "--chains", "1", "--work", str(tmp_path / "w"), "--", *args])
    out = capsys.readouterr().out
    summary = loop.json.loads(out.strip().splitlines()[-1])
    events = [e for ch in summary["chains"] for e in ch["events"]]
    # every kill asked for is made, one at each moment: a chain that finished before its kill (a late
    # random kill) is followed by another, which takes over the moment
    assert summary["kills"] == 3, summary
    assert sorted(e for e in events if e != "finished") == [
        "killed after_checkpoint", "killed during_checkpoint", "killed random"], events
    assert summary["ref_spread"]["tensors_differ"] == 0  # two default runs are bitwise equal
    assert summary["bitwise_equal"] and rc == 0, out
    # the chain really resumed from checkpoints: its metrics restart after a kill
    assert (tmp_path / "w" / "chain0" / "checkpoints").is_dir()


def test_a_chain_that_differs_fails(monkeypatch, tmp_path):
    """The comparison can fail: weights that differ in one bit make ``bitwise_equal`` false."""
    import torch

    loop = _load()
    a = {"w": torch.zeros(3)}
    b = {"w": torch.tensor([0.0, 1e-7, 0.0])}
    assert loop._max_diff(a, a) == (0, 0.0)
    n, d = loop._max_diff(a, b)
    assert n == 1 and d == pytest.approx(1e-7)
