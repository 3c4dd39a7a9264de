"""End-to-end runs of an HF family (tiny random Qwen2.5-VL) through the same loop as the composed model:
LoRA on GridNav (LeRobot reader) with a verified merged export, full fine-tuning on LLaVA JSON, a
two-source mixture, skip-mode counts, and bitwise resume from a mid-run checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from vlmtrain.cli import main as cli_main
from vlmtrain.config import RunConfig, SourceConfig
from vlmtrain.data.errors import DataError
from vlmtrain.data.mixture import planned_count
from vlmtrain.models.protocol import Turn
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
from vlmtrain.train.export_run import load_trained_model
from vlmtrain.train.loop import train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return save_tiny_qwen_vl(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", family="qwen2_5_vl", seed=0)


@pytest.fixture
def hf_cfg(tiny_qwen, gridnav_root, tmp_path, qwen_lora_cfg) -> RunConfig:
    """A LoRA run of the tiny Qwen2.5-VL on the session GridNav data (2 history frames, 32 px)."""
    cfg = qwen_lora_cfg(tiny_qwen, gridnav_root, tmp_path / "run")
    cfg.train.log_every = 1
    cfg.optim.warmup_steps = 2
    return cfg


def _write_llava(root: Path, n: int, bad: bool = False) -> Path:
    """``n`` records "which colour is this?" over solid-colour PNGs; ``bad`` appends one record per
    defect that skip mode must count."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 36), rgb).save(root / "img" / f"{name}.png")
    (root / "img" / "broken.png").write_bytes(b"not an image")
    records = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        records.append({"id": str(i), "image": f"img/{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich colour is this?"}, {"from": "gpt", "value": name}]})
    if bad:
        ask = {"from": "human", "value": "<image>\nWhich colour?"}
        records += [
            {"image": "img/missing.png", "conversations": [ask, {"from": "gpt", "value": "red"}]},
            {"image": "img/red.png", "conversations": [ask]},
            {"image": "img/red.png", "conversations": [{"from": "human", "value": "<image><image> two?"},
                                                       {"from": "gpt", "value": "red"}]},
            {"image": "img/red.png", "conversations": [ask, {"from": "gpt", "value": "red " * 300}]},
            {"image": "img/broken.png", "conversations": [ask, {"from": "gpt", "value": "red"}]},
        ]
    path = root / "colours.json"
    path.write_text(json.dumps(records))
    return path


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss/train"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_learns(run_dir: Path) -> None:
    losses = _losses(run_dir)
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    assert last < 0.5 * first, (first, last)


def _logits(model, adapter, frames_dir: Path) -> torch.Tensor:
    """Logits of the HF forward of ``model`` on one two-frame conversation built by ``adapter``."""
    enc = adapter.encode_conversation([Turn("user", "<image><image> now: go to the red box."),
                                       Turn("assistant", "STOP")])
    paths = sorted(frames_dir.rglob("*.jpg"))[:2]
    frames = adapter.preprocess([Image.open(p) for p in paths])
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=frames.pixels.flatten(0, 1),
                     image_grid_thw=frames.meta["image_grid_thw"],
                     mm_token_type_ids=(ids == adapter.image_token_id).int()).logits


def test_lora_gridnav_learns_and_merged_export_matches(hf_cfg, gridnav_root, tmp_path, caplog):
    hf_cfg.train.steps = 50
    with caplog.at_level(logging.INFO):
        summary = train(hf_cfg)
    assert any(r.getMessage().startswith("LoRA: trainable") for r in caplog.records)
    run = Path(hf_cfg.output_dir)
    _assert_learns(run)
    assert summary["data"]["sources"]["train"]["planned"] == summary["data"]["samples"] > 0
    assert summary["trainable_parameters"]["llm"] > 0
    assert (run / "checkpoints" / "step-0000050" / "trained.safetensors").exists()

    assert cli_main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    trained = load_trained_model(run)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    expected = _logits(trained.hf, trained, gridnav_root)
    torch.testing.assert_close(_logits(merged, trained, gridnav_root), expected, rtol=1e-5, atol=1e-5)
    # the run's own model/ is the same merged model
    a, b = load_file(run / "model" / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lora,steps,lr", [(False, 30, 1e-3), (True, 50, 2e-3)], ids=["full", "lora"])
def test_finetune_on_llava_json_learns(hf_cfg, tmp_path, lora, steps, lr):
    hf_cfg.model.lora = lora
    hf_cfg.data.format = "llava_json"
    hf_cfg.data.root = str(_write_llava(tmp_path / "llava", 36))
    hf_cfg.train.steps = steps
    hf_cfg.optim.lr = lr
    summary = train(hf_cfg)
    _assert_learns(Path(hf_cfg.output_dir))
    assert summary["data"]["samples"] == 36 and summary["data"]["frames"] == 3


def test_two_source_mixture_logs_and_reports_counts(hf_cfg, gridnav_root, tmp_path, caplog):
    colours = _write_llava(tmp_path / "llava", 12)
    hf_cfg.data.sources = [SourceConfig(name="gridnav", format="lerobot_vln", path=str(gridnav_root), percent=10),
                           SourceConfig(name="colours%250", format="llava_json", path=str(colours))]
    hf_cfg.train.steps = 2
    with caplog.at_level(logging.INFO):
        summary = train(hf_cfg)
    sources = json.loads((Path(hf_cfg.output_dir) / "summary.json").read_text())["data"]["sources"]
    assert sources == summary["data"]["sources"]
    gridnav = sources["gridnav"]
    assert gridnav["percent"] == 10 and gridnav["planned"] == planned_count(gridnav["available"], 10)
    assert sources["colours"] == {"available": 12, "percent": 250.0, "planned": 30}
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data mixture"))
    assert "gridnav" in table and "colours" in table and "250%" in table
    assert summary["data"]["samples"] == gridnav["planned"] + 30


def test_skip_mode_counts_bad_records(hf_cfg, tmp_path):
    hf_cfg.data.format = "llava_json"
    hf_cfg.data.root = str(_write_llava(tmp_path / "llava", 12, bad=True))
    hf_cfg.data.max_length = 128
    hf_cfg.train.steps = 1
    with pytest.raises(DataError, match="missing_image"):
        train(hf_cfg)
    hf_cfg.data.on_error = "skip"
    summary = train(hf_cfg)
    expected = {"missing_image": 1, "no_answer": 1, "image_count_mismatch": 1, "too_long": 1, "unreadable_image": 1}
    assert summary["data"]["skipped"] == expected
    saved = json.loads((Path(hf_cfg.output_dir) / "summary.json").read_text())
    assert saved["data"]["skipped"] == expected and saved["data"]["samples"] == 12


def test_adapter_resume_is_bitwise_identical(hf_cfg, tmp_path):
    hf_cfg.train.steps = 8
    hf_cfg.train.ckpt_every = 4
    hf_cfg.train.keep_checkpoints = 10
    hf_cfg.output_dir = str(tmp_path / "ref")
    train(hf_cfg)
    ref = tmp_path / "ref"
    # the interrupted run: the reference's state at step 4 (what a kill after that checkpoint leaves)
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    for done in (cut / "checkpoints" / "step-0000008", cut / "model", cut / "summary.json"):
        shutil.rmtree(done) if done.is_dir() else done.unlink()
    hf_cfg.output_dir = str(cut)
    hf_cfg.train.resume = True
    train(hf_cfg)
    a = load_file(ref / "checkpoints" / "step-0000008" / "trained.safetensors")
    b = load_file(cut / "checkpoints" / "step-0000008" / "trained.safetensors")
    assert a.keys() == b.keys() and any(".lora_A." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(cut) == _losses(ref)
