"""Every example YAML in configs/ loads and validates; the HF ones say how to make their model, and
one of them runs end to end on a tiny model made by scripts/make_tiny_vlm.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from vlmtrain.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_validates(path):
    cfg = load_config(RunConfig(), path, [])
    assert cfg.output_dir == f"runs/{path.stem}"
    if cfg.model.family != "composed":
        # the header tells how to make the model the config points at
        text = path.read_text()
        assert f"make_tiny_vlm.py --family {cfg.model.family} --out {cfg.model.path}" in text


def test_expected_examples_exist():
    names = {p.stem for p in CONFIGS}
    assert {"qwen2_5_vl_lora_gridnav", "qwen2_vl_gridnav", "qwen3_vl_gridnav", "smolvlm_llava_json",
            "llava_llava_json", "format_internvla_n1", "format_streamvln", "format_internvl_meta",
            "mixture"} <= names


def _script():
    spec = importlib.util.spec_from_file_location("make_tiny_vlm", ROOT / "scripts" / "make_tiny_vlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_on_a_tiny_model_from_the_script(gridnav_root, tmp_path):
    from vlmtrain.train.loop import train

    assert _script().main(["--family", "qwen2_5_vl", "--out", str(tmp_path / "tiny")]) == 0
    cfg = load_config(RunConfig(), ROOT / "configs" / "qwen2_5_vl_lora_gridnav.yaml", [
        f"model.path={tmp_path / 'tiny'}", f"data.root={gridnav_root}", "data.gridnav_episodes=0",
        f"output_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=4", "train.progress=false"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
