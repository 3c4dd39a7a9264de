"""Every example YAML in configs/ loads and validates; the HF ones say how to make their model, and
one of them runs end to end on a tiny model made by scripts/make_tiny_vlm.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from vlmtrain.config import RunConfig, flatten, load_config, save_config, source_name_and_percent, valid_keys

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


# Every example and what its header promises: (model.family, model.lora, data formats read,
# {source name: percent} for mixtures of data.sources).
EXAMPLES = {
    "format_internvl_meta": ("qwen2_5_vl", True, ["internvl_meta"], {"internvl": 100.0}),
    "format_internvla_n1": ("qwen2_5_vl", True, ["internvla_n1"], {"r2r_125cm_0_30": 50.0}),
    "format_streamvln": ("qwen2_5_vl", True, ["streamvln"], {"r2r": 100.0}),
    "gridnav": ("composed", False, ["lerobot_vln"], {}),
    "internvla_n1_s2": ("qwen2_5_vl", False, ["internvla_n1"], {"r2r_125cm_0_30": 100.0}),
    "internvla_n1_s2_gridnav": ("qwen2_5_vl", False, ["internvla_n1"], {"gridnav_125cm_0_30": 100.0}),
    "internvla_n1_s2_qwen3_vl": ("qwen3_vl", False, ["internvla_n1"], {"r2r_125cm_0_30": 100.0}),
    "janusvln_qwen2_5_vl": ("qwen2_5_vl", True, ["internvla_n1"], {"r2r_125cm_0_30": 100.0}),
    "janusvln_qwen2_5_vl_gridnav": ("qwen2_5_vl", True, ["lerobot_vln"], {}),
    "janusvln_qwen2_5_vl_llava_json": ("qwen2_5_vl", True, ["llava_json"], {}),
    "llava_llava_json": ("llava", True, ["llava_json"], {}),
    "mixture": ("qwen2_5_vl", True, ["lerobot_vln", "llava_json", "streamvln"],
                {"gridnav": 50.0, "captions": 200.0, "r2r": 100.0}),
    "qwen2_5_vl_lora_gridnav": ("qwen2_5_vl", True, ["lerobot_vln"], {}),
    "qwen2_vl_gridnav": ("qwen2_vl", False, ["lerobot_vln"], {}),
    "qwen3_vl_gridnav": ("qwen3_vl", True, ["lerobot_vln"], {}),
    "smolvlm_llava_json": ("idefics3", True, ["llava_json"], {}),
}


def test_expected_examples_exist():
    assert {p.stem for p in CONFIGS} == set(EXAMPLES), "add a new example to EXAMPLES with what it promises"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_key_values(path):
    family, lora, formats, percents = EXAMPLES[path.stem]
    cfg = load_config(yaml_path=path)
    assert (cfg.model.family, cfg.model.lora) == (family, lora)
    assert ([s.format for s in cfg.data.sources] or [cfg.data.format]) == formats
    assert dict(source_name_and_percent(s) for s in cfg.data.sources) == percents



@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_sets_what_the_file_says(path):
    """Every value written in the file (as PyYAML reads it) is the loaded config's value."""
    written = flatten(yaml.safe_load(path.read_text()))
    loaded = flatten(dataclasses.asdict(load_config(yaml_path=path)))
    for key, value in written.items():
        if key == "data.sources":
            assert len(loaded[key]) == len(value)
            for item, src in zip(value, loaded[key]):
                assert {k: src[k] for k in item} == item
        else:
            assert loaded[key] == value, key


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_round_trips_through_save_config(path, tmp_path):
    cfg = load_config(yaml_path=path)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(yaml_path=tmp_path / "config.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    # the saved file is complete: every key is written, so it does not depend on today's defaults
    assert set(flatten(yaml.safe_load((tmp_path / "config.yaml").read_text()))) == set(valid_keys())


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


@pytest.mark.parametrize("name", ["janusvln_qwen2_5_vl", "janusvln_qwen2_5_vl_gridnav", "janusvln_qwen2_5_vl_llava_json"])
def test_janusvln_recipes_run_on_the_scripts_tiny_models(name, gridnav_root, tmp_path):
    """Each JanusVLN recipe trains 2 steps on the tiny Qwen2.5-VL and the tiny DINOv2 the script
    writes, on its own data format, and saves its spatial branch beside the final model."""
    import sys

    from vlmtrain.tools.workload import write_vln_workload
    from vlmtrain.train.loop import train

    script = _script()
    assert script.main(["--family", "qwen2_5_vl", "--out", str(tmp_path / "qwen")]) == 0
    assert script.main(["--family", "dinov2", "--out", str(tmp_path / "dino")]) == 0
    overrides = [f"model.path={tmp_path / 'qwen'}", f"model.spatial_encoder={tmp_path / 'dino'}",
                 f"output_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=4", "train.progress=false",
                 "train.ckpt_every=0"]
    if name == "janusvln_qwen2_5_vl":
        sys.path.insert(0, str(ROOT / "tests" / "data" / "formats"))
        from test_internvla_n1 import write_scene

        overrides.append(f"data.sources=[{{name: r2r_125cm_0_30, format: internvla_n1, "
                         f"path: {write_scene(tmp_path / 'n1')}}}]")
    elif name.endswith("gridnav"):
        overrides += [f"data.root={gridnav_root}", "data.gridnav_episodes=0"]
    else:
        workload = write_vln_workload(tmp_path / "vln", episodes=2, heldout_episodes=1, size=32)
        overrides.append(f"data.root={workload.root / 'data' / 'train.json'}")
    cfg = load_config(RunConfig(), ROOT / "configs" / f"{name}.yaml", overrides)
    assert cfg.data.num_history == 8 or cfg.data.format == "llava_json"
    summary = train(cfg)
    assert summary["steps"] == 2
    meta = json.loads((tmp_path / "run" / "model" / "spatial" / "spatial.json").read_text())
    assert meta["settings"]["weight"] == 0.2
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("spatial/frames_encoded_per_sample" in m for m in metrics)


def _n1_scene(tmp_path: Path) -> Path:
    """The issue's 3-episode, 107-frame InternData-N1 scene: 21 pixel-goal, 3 turn and 15 STOP samples
    at r2r_125cm_0_30 (tests/data/formats/test_internvla_n1_reference.py)."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "data" / "formats"))
    from test_internvla_n1_reference import write_scene

    return write_scene(tmp_path / "scene")


def _s2_overrides(tmp_path: Path, model: Path, scene: Path) -> list[str]:
    # One CPU process instead of torchrun + ZeRO-2; no packing and 13 samples a step: 39 / 13 = 3 steps
    # per epoch. Everything else is the recipe's (bf16, checkpointing, 6 epochs, its schedule).
    return [f"model.path={model}", f"output_dir={tmp_path / 'run'}", "parallel.backend=none",
            f"data.sources=[{{name: r2r_125cm_0_30, format: internvla_n1, path: {scene}}}]",
            f"data.index_dir={tmp_path / 'index'}", "data.packing=false", "train.batch_size=13",
            "train.log_every=1", "train.progress=false", "train.ckpt_every=0"]


def test_internvla_n1_s2_plan_reports_steps_per_epoch_from_the_reference_counts(tmp_path, capsys):
    """`vlmtrain plan` on the recipe: 39 samples (pixel_goal 21, stop 15, turn 3), 3 steps per epoch,
    18 in 6 epochs."""
    from vlmtrain.cli import main

    assert _script().main(["--family", "qwen2_5_vl", "--out", str(tmp_path / "qwen")]) == 0
    overrides = _s2_overrides(tmp_path, tmp_path / "qwen", _n1_scene(tmp_path))
    assert main(["plan", "--config", str(ROOT / "configs" / "internvla_n1_s2.yaml"), *overrides]) == 0
    out = capsys.readouterr().out
    assert re.search(r"r2r_125cm_0_30\s+39\s+100%\s+39\s+pixel_goal 21, stop 15, turn 3", out), out
    assert "steps: 3 per epoch, 18 in total (6.0 epochs)" in out


def test_internvla_n1_s2_lora_run_trains_with_falling_loss(tmp_path, caplog):
    """The Qwen2.5-VL recipe with LoRA (model.lora=true and the LoRA rate its header names) runs its 6
    epochs; every epoch sees the same 39 samples, so the mean loss of the last epoch is the same
    quantity as the first epoch's, and it is lower. The start-up log gives the kinds and the length."""
    from vlmtrain.train.loop import train

    assert _script().main(["--family", "qwen2_5_vl", "--out", str(tmp_path / "qwen")]) == 0
    overrides = _s2_overrides(tmp_path, tmp_path / "qwen", _n1_scene(tmp_path)) + ["model.lora=true", "optim.lr=1e-4"]
    cfg = load_config(RunConfig(), ROOT / "configs" / "internvla_n1_s2.yaml", overrides)
    assert (cfg.train.epochs, cfg.train.precision, cfg.optim.lr_vision) == (6, "bf16", 5e-6)
    with caplog.at_level("INFO", logger="vlmtrain"):
        summary = train(cfg)
    assert summary["steps"] == 18
    assert "r2r_125cm_0_30: planned samples per kind {'pixel_goal': 21, 'stop': 15, 'turn': 3}" in caplog.text
    assert "run length: 18 steps (6 epochs, 3 steps per epoch)" in caplog.text
    assert summary["data"]["sources"]["r2r_125cm_0_30"]["kinds"] == {"pixel_goal": 21, "stop": 15, "turn": 3}
    losses = [m["loss/train"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss/train" in m]
    assert len(losses) == 18
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.97 * first, losses
    assert (tmp_path / "run" / "model").is_dir()


def test_internvla_n1_s2_qwen3_vl_recipe_runs(tmp_path):
    """The Qwen3-VL variant, full fine-tuning as written, trains 2 steps on the script's tiny Qwen3-VL."""
    from vlmtrain.train.loop import train

    assert _script().main(["--family", "qwen3_vl", "--out", str(tmp_path / "qwen3")]) == 0
    overrides = _s2_overrides(tmp_path, tmp_path / "qwen3", _n1_scene(tmp_path)) + ["train.epochs=0", "train.steps=2"]
    cfg = load_config(RunConfig(), ROOT / "configs" / "internvla_n1_s2_qwen3_vl.yaml", overrides)
    summary = train(cfg)
    assert summary["steps"] == 2
    losses = [m["loss/train"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
