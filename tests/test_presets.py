"""Presets validate, hold the values the README and docs promise, and configs/gridnav.yaml is the same
run as the gridnav preset."""

from dataclasses import asdict
from pathlib import Path

import pytest

from vlmtrain.config import ConfigError, RunConfig, flatten, load_config
from vlmtrain.presets import PRESETS, get_preset

ROOT = Path(__file__).resolve().parents[1]



def test_preset_names():
    assert sorted(PRESETS) == ["gridnav", "gridnav_tiny"]
    with pytest.raises(KeyError, match="unknown preset 'nope': choose from gridnav, gridnav_tiny"):
        get_preset("nope")


def test_presets_are_fresh_objects():
    a = get_preset("gridnav")
    a.train.steps = 1
    assert get_preset("gridnav").train.steps == 1200


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    preset = get_preset(name)
    cfg = load_config(preset, None, [])  # load_config validates its base
    assert asdict(cfg) == asdict(preset)  # validation leaves a valid preset as it is
    assert cfg.output_dir == f"runs/{name}"
    # Validation really looks at the preset's own values: break one and it is refused.
    broken = get_preset(name)
    broken.train.grad_accum = 3  # neither 128 nor 16 is a multiple of 3
    with pytest.raises(ConfigError, match="train.batch_size=.* is not a multiple of train.grad_accum=3"):
        load_config(broken, None, [])
    broken = get_preset(name)
    broken.model.history_tokens = 2
    with pytest.raises(ConfigError, match="history_tokens=2: must be a square"):
        load_config(broken, None, [])


def test_gridnav_preset_values():
    cfg = get_preset("gridnav")
    flat = flatten(asdict(cfg))
    expected = {
        "output_dir": "runs/gridnav",          # README: vlmtrain eval runs/gridnav
        "seed": 0,
        "model.family": "composed",            # README: the demo trains the composed VLM
        "data.root": "data/gridnav/train",     # README: vlmtrain data gridnav --out data/gridnav/train
        "data.format": "lerobot_vln",
        "data.sources": [],
        "data.gridnav_episodes": 1500,         # README: --episodes 1500
        "data.num_history": 1,                 # README: 1 history frame instead of InternVLA-N1's 8
        "data.image_size": 32,
        "model.history_tokens": 1,             # each history frame pooled to one token
        "model.patch_size": 8,
        "model.pixel_shuffle": 2,              # (32 / 8 / 2)^2 = 4 tokens for the current frame
        "train.steps": 1200,
        "train.batch_size": 128,
        "train.grad_accum": 1,
        "train.ckpt_every": 300,
        "train.best_metric": "eval/sr",        # README: the demo reports the best checkpoint
        "eval.every": 300,
        "eval.rollout_episodes": 100,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 60,
    }
    assert {k: flat[k] for k in expected} == expected


def test_gridnav_tiny_differs_from_gridnav_only_in_size():
    tiny, full = flatten(asdict(get_preset("gridnav_tiny"))), flatten(asdict(get_preset("gridnav")))
    assert {k: tiny[k] for k in tiny if tiny[k] != full[k]} == {
        "output_dir": "runs/gridnav_tiny",
        "data.root": "data/gridnav_tiny/train",
        "data.gridnav_episodes": 24,
        "data.load_workers": 1,
        "model.vision_hidden": 32,
        "model.vision_intermediate": 64,
        "model.vision_heads": 2,
        "model.lm_hidden": 32,
        "model.lm_intermediate": 64,
        "model.lm_heads": 2,
        "model.lm_kv_heads": 2,
        "train.steps": 20,
        "train.batch_size": 16,
        "train.log_every": 5,
        "train.ckpt_every": 10,
        "optim.warmup_steps": 2,
        "optim.lr": 5e-3,
        "eval.episodes": 8,
        "eval.every": 0,                  # seconds-long runs validate only where a test asks
        "eval.rollout_episodes": 0,
        "train.best_metric": "",
    }


# Fields where configs/gridnav.yaml may differ from the preset, as its header documents: none (its
# first line says it is the same run as `vlmtrain train --preset gridnav`).
GRIDNAV_YAML_DIFFERENCES: dict = {}


def test_gridnav_yaml_equals_preset():
    path = ROOT / "configs" / "gridnav.yaml"
    assert "the same run as `vlmtrain train --preset gridnav`" in path.read_text()
    from_yaml = flatten(asdict(load_config(RunConfig(), yaml_path=path)))
    preset = flatten(asdict(get_preset("gridnav")))
    assert from_yaml.keys() == preset.keys()
    diffs = {k: (from_yaml[k], preset[k]) for k in preset if from_yaml[k] != preset[k]}
    assert diffs == GRIDNAV_YAML_DIFFERENCES, f"configs/gridnav.yaml drifted from presets.gridnav(): {diffs}"
    # and the file is not vacuous: it really sets the demo's values over the defaults
    assert from_yaml["train.steps"] == 1200 and from_yaml["data.num_history"] == 1
    assert from_yaml["eval.every"] == 300 and from_yaml["train.best_metric"] == "eval/sr"
    assert from_yaml["model.history_tokens"] == 1 and from_yaml["data.gridnav_episodes"] == 1500
