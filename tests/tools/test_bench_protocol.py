"""``vlmtrain bench --protocol internvl`` on the tiny GridNav preset: TGS mean and spread over at least
15 measured steps, the hyper-parameters printed, the result appended to a results file, exit 1 when the
loss target is missed and exit 2 on bad arguments."""

from __future__ import annotations

import json
import statistics

import pytest

from vlmtrain.cli import main


def _args(gridnav_root, tmp_path, *extra: str) -> list[str]:
    return ["bench", "--protocol", "internvl", "--preset", "gridnav_tiny", f"data.root={gridnav_root}",
            "data.gridnav_episodes=0", f"output_dir={tmp_path / 'run'}", "--results",
            str(tmp_path / "results.jsonl"), *extra]


def test_protocol_prints_tgs_spread_and_gates_on_the_loss(gridnav_root, tmp_path, capsys):
    # A target any run meets: passes, exit 0.
    assert main(_args(gridnav_root, tmp_path, "--steps", "15", "--loss-target", "100", "--loss-steps", "20")) == 0
    out = capsys.readouterr().out
    assert "protocol internvl: 5 warm-up steps, 15 measured steps" in out  # 20 steps = 5 warm-up + 15
    assert "global_batch             16" in out and "per_device_micro_batch   16" in out  # gridnav_tiny
    assert "optim.lr                 0.005" in out
    assert "over 15 steps" in out and ": PASS" in out
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    per = rec["tgs_per_step"]
    assert len(per) == rec["measured_steps"] == 15
    assert rec["tgs"]["min"] == min(per) and rec["tgs"]["max"] == max(per)
    assert rec["tgs"]["mean"] == pytest.approx(statistics.fmean(per), abs=0.01)
    assert rec["tgs"]["std"] > 0  # a real spread over real steps, not one figure repeated
    # tokens per GPU per second = samples/s x mean sequence length (one process: one "GPU")
    assert rec["tgs"]["mean"] == pytest.approx(rec["samples_per_s"]["mean"] * rec["mean_seq_len"], rel=0.1)
    assert rec["loss"]["after_steps"] == 20 and rec["passed"] is True

    # A target no 20-step run meets: FAIL, exit 1, and the result is appended, not overwritten.
    assert main(_args(gridnav_root, tmp_path, "--steps", "15", "--loss-target", "0.0001", "--loss-steps", "20")) == 1
    out = capsys.readouterr().out
    assert "> target 0.0001: FAIL" in out
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["passed"] is False
    # Same config, seed and steps: the same losses, so the same loss figure in both results.
    assert json.loads(lines[1])["loss"]["value"] == rec["loss"]["value"]


@pytest.mark.parametrize("extra, message", [
    (["--steps", "10"], "--steps 10: the internvl protocol measures at least 15 steps"),
    (["--loss-target", "1.0"], "--loss-target and --loss-steps go together"),
    (["--loss-target", "1.0", "--loss-steps", "7"], "--loss-steps 7: at least 10"),
])
def test_bad_protocol_arguments_are_one_line_errors(gridnav_root, tmp_path, capsys, extra, message):
    assert main(_args(gridnav_root, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "results.jsonl").exists()


def test_protocol_does_not_combine_with_compare(gridnav_root, tmp_path, capsys):
    assert main(_args(gridnav_root, tmp_path, "--compare", "naive")) == 2
    assert "does not combine with --compare" in capsys.readouterr().err
