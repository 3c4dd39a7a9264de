"""Every user error of ``vlmtrain`` is one line on stderr and exit code 2: config, data (naming the
annotation file, the record and the reason), a missing model directory, a bad checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlmtrain.config import save_config

ok = [{"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": "red"}]


def _vlmtrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process (what a user's shell sees)."""
    return subprocess.run([sys.executable, "-m", "vlmtrain.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("vlmtrain:")]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-3000:]
    return lines[0]


def test_unreadable_image_names_annotation_file_record_and_image(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    records = [{"image": f"{i % 3}.png", "conversations": ok} for i in range(4)]
    records.insert(2, {"image": "broken.png", "conversations": ok})
    ann = tmp_path / "train.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = _vlmtrain("train", "--preset", "gridnav_tiny", f"output_dir={tmp_path / 'run'}", "data.format=llava_json",
                     f"data.root={ann}", "data.gridnav_episodes=0", "train.progress=false", cwd=tmp_path)
    line = _one_error_line(proc, "vlmtrain: data error: ")
    assert line == (f"vlmtrain: data error: {ann}: line 3: unreadable_image: image {tmp_path / 'broken.png'} "
                    "cannot be opened as an image")


def test_bad_json_record_names_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    ann = tmp_path / "train.jsonl"
    ann.write_text(json.dumps({"image": "0.png", "conversations": ok}) + "\n{not json\n")
    proc = _vlmtrain("train", "--preset", "gridnav_tiny", f"output_dir={tmp_path / 'run'}", "data.format=llava_json",
                     f"data.root={ann}", "data.gridnav_episodes=0", "train.progress=false", cwd=tmp_path)
    _one_error_line(proc, f"vlmtrain: data error: {ann}: line 2: ")


def test_missing_model_dir_is_one_line(tmp_path):
    proc = _vlmtrain("train", f"output_dir={tmp_path / 'run'}", "model.family=qwen2_5_vl",
                     f"model.path={tmp_path / 'nowhere'}", "train.progress=false", cwd=tmp_path)
    assert str(tmp_path / "nowhere") in _one_error_line(proc, "vlmtrain: ")


@pytest.mark.slow
def test_corrupt_checkpoint_is_one_line_naming_it(tiny_cfg, tmp_path):
    tiny_cfg.train.steps, tiny_cfg.train.ckpt_every = 10, 10
    cfg_path = tmp_path / "run.yaml"
    save_config(tiny_cfg, cfg_path)
    assert _vlmtrain("train", "--config", str(cfg_path), cwd=tmp_path).returncode == 0
    ckpt = Path(tiny_cfg.output_dir) / "checkpoints" / "step-0000010"
    (ckpt / "trained.safetensors").write_bytes(b"\0" * 64)  # a torn copy
    proc = _vlmtrain("train", "--config", str(cfg_path), "train.resume=true", "train.steps=20", cwd=tmp_path)
    line = _one_error_line(proc, "vlmtrain: checkpoint error: ")
    assert str(ckpt) in line and "cannot resume from this checkpoint" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_image_corrupt_past_its_header_names_the_record_when_decoded_lazily(tmp_path, workers):
    """A PNG whose signature is fine but whose body is cut passes the index's header check and fails
    only when a step decodes it: on the loader thread or (``data.workers=1``) in a loader process. The
    error still names the annotation file and the record that showed the image."""
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:40])
    records = [{"image": f"{i % 3}.png", "conversations": ok} for i in range(20)]
    records.insert(2, {"image": "cut.png", "conversations": ok})
    ann = tmp_path / "train.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = _vlmtrain("train", "--preset", "gridnav_tiny", f"output_dir={tmp_path / 'run'}", "data.format=llava_json",
                     f"data.root={ann}", "data.gridnav_episodes=0", "train.progress=false", f"data.workers={workers}",
                     "train.steps=4", cwd=tmp_path)
    line = _one_error_line(proc, "vlmtrain: data error: ")
    assert line.startswith(f"vlmtrain: data error: {ann}: line 3: unreadable_image: image {tmp_path / 'cut.png'}"), line
