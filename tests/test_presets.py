"""The YAML form of the demo must stay the same run as the preset the README uses."""

from dataclasses import asdict
from pathlib import Path

from vlmtrain.config import RunConfig, load_config
from vlmtrain.presets import PRESETS, get_preset

ROOT = Path(__file__).resolve().parents[1]


def test_gridnav_yaml_equals_preset():
    from_yaml = asdict(load_config(RunConfig(), str(ROOT / "configs" / "gridnav.yaml"), []))
    preset = asdict(get_preset("gridnav"))
    diffs = {k: (from_yaml[k], preset[k]) for k in preset if from_yaml[k] != preset[k]}
    assert not diffs, f"configs/gridnav.yaml drifted from presets.gridnav(): {diffs}"


def test_presets_validate():
    for name in PRESETS:
        cfg = load_config(get_preset(name), None, [])
        assert cfg.output_dir.startswith("runs/")
