"""End-to-end: a short run learns, resumes exactly after SIGKILL, and evaluates closed loop."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmtrain.config import save_config
from vlmtrain.train.evaluate import evaluate_run, format_report
from vlmtrain.train.loop import train


def test_short_run_loss_falls_and_writes_run_dir(tiny_cfg):
    tiny_cfg.train.steps = 30
    summary = train(tiny_cfg)
    out = Path(tiny_cfg.output_dir)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [5, 10, 15, 20, 25, 30]
    assert lines[-1]["loss/train"] < 0.6 * lines[0]["loss/train"]
    for key in ("loss/train", "optim/lr", "optim/grad_norm", "throughput/samples_per_s", "throughput/tokens_per_s",
                "data/images_per_sample", "data/visual_tokens_per_sample"):
        assert key in lines[-1]
    # images per sample counts frames (1..9), not patches
    assert 1.0 <= lines[-1]["data/images_per_sample"] <= 9.0
    for key in ("steps", "samples", "train_wall_s", "samples_per_s", "tokens_per_s", "final_loss"):
        assert key in summary
    # Packed steps (the default) hold about batch_size samples: whole packs, planned from token budgets.
    assert 0.9 * 30 * tiny_cfg.train.batch_size <= summary["samples"] <= 1.1 * 30 * tiny_cfg.train.batch_size
    assert (out / "config.yaml").exists() and (out / "model" / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000020", "step-0000030"]

    # ``vlmtrain export`` rebuilds the model from config, tokenizer and the newest checkpoint (step 30,
    # trainable tensors only): the same weights as the final model/.
    from vlmtrain.cli import main as cli_main

    assert cli_main(["export", str(out), "--merged", str(out / "exported")]) == 0
    final, exported = load_file(out / "model" / "model.safetensors"), load_file(out / "exported" / "model.safetensors")
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    assert (out / "exported" / "tokenizer.json").read_text() == (out / "model" / "tokenizer.json").read_text()

    report = evaluate_run(out, episodes=6)
    saved = json.loads((out / "eval.json").read_text())
    assert saved == report
    for r in (report, report["baselines"]["random"], report["baselines"]["forward"]):
        assert {"episodes", "sr", "spl", "ne", "os", "ndtw"} <= set(r)
    assert report["episodes"] == 6
    assert "baseline: forward" in format_report(report)


def _run_cli(cfg_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlmtrain.cli", "train", "--config", str(cfg_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_and_resume_gives_bitwise_identical_weights(tiny_cfg, tmp_path):
    tiny_cfg.train.steps = 60
    tiny_cfg.train.ckpt_every = 5
    tiny_cfg.train.keep_checkpoints = 100  # default threads: a CPU run is bitwise reproducible
    # reference: one uninterrupted run
    ref_cfg = tmp_path / "ref.yaml"
    tiny_cfg.output_dir = str(tmp_path / "ref")
    save_config(tiny_cfg, ref_cfg)
    assert _run_cli(ref_cfg).wait(timeout=300) == 0

    # interrupted: SIGKILL as soon as the first checkpoint exists, then resume
    tiny_cfg.output_dir = str(tmp_path / "killed")
    cfg = tmp_path / "killed.yaml"
    save_config(tiny_cfg, cfg)
    proc = _run_cli(cfg)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.exists() and any(p.name.startswith("step-") for p in ckpts.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it was killed"
    done = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert int(done[-1].split("-")[1]) < 60
    assert _run_cli(cfg, "train.resume=true").wait(timeout=300) == 0

    a = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics of the resumed run continue the killed one without duplicates
    steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    ref_loss = [json.loads(l)["loss/train"] for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    res_loss = [json.loads(l)["loss/train"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert res_loss[-1] == ref_loss[-1]


def test_cli_unknown_key_fails_with_hint(tmp_path, capsys):
    from vlmtrain.cli import main

    assert main(["train", "--preset", "gridnav_tiny", f"output_dir={tmp_path}", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_composed_model_trains_on_llava_json_through_the_one_data_path(tiny_cfg, tmp_path):
    """The composed model reads a LLaVA JSON file like any HF family (sources -> its own chat format):
    a colour question on solid-colour images is learned (the closed answer set becomes single tokens)."""
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
    for name, rgb in colours.items():
        Image.new("RGB", (48, 48), rgb).save(tmp_path / f"{name}.png")
    records = [{"image": f"{name}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the picture?"}, {"from": "gpt", "value": name}]}
        for _ in range(12) for name in colours]
    (tmp_path / "train.json").write_text(json.dumps(records))
    tiny_cfg.data.root, tiny_cfg.data.format = str(tmp_path / "train.json"), "llava_json"
    tiny_cfg.train.steps, tiny_cfg.train.log_every = 40, 10
    summary = train(tiny_cfg)
    out = Path(tiny_cfg.output_dir)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["data"]["samples"] == 48 and summary["data"]["frames"] == 4
    assert lines[-1]["loss/train"] < 0.35 * lines[0]["loss/train"]
    tok = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    assert {"red", "green", "blue", "yellow"} <= {t["content"] for t in tok["added_tokens"]}
