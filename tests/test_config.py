import pytest

from vlmtrain.config import ConfigError, RunConfig, load_config, to_yaml, valid_keys
from vlmtrain.presets import get_preset


def test_overrides_are_typed_and_applied():
    cfg = load_config(RunConfig(), overrides=["optim.lr=3e-4", "train.resume=true", "train.steps=7"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.resume is True
    assert cfg.train.steps == 7


def test_bool_false_string_is_false():
    cfg = load_config(RunConfig(), overrides=["train.progress=false"])
    assert cfg.train.progress is False


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        load_config(RunConfig(), overrides=["optim.lrr=1"])


def test_unknown_yaml_key_names_file_and_hint(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  stpes: 5\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*train\.stpes.*train\.steps"):
        load_config(RunConfig(), yaml_path=f)


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.steps") as e:
        load_config(RunConfig(), overrides=["train.steps=many"])
    assert "\n" not in str(e.value)  # one line, not OmegaConf's full_key / object_type block


def test_empty_override_empties_a_string():
    cfg = load_config(RunConfig(), overrides=["model.spatial_encoder=/x", "model.spatial_encoder="])
    assert cfg.model.spatial_encoder == ""
    with pytest.raises(ConfigError, match="train.steps=") as e:
        load_config(RunConfig(), overrides=["train.steps="])
    assert "\n" not in str(e.value)


def test_bad_choice_is_an_error():
    with pytest.raises(ConfigError, match="precision"):
        load_config(RunConfig(), overrides=["train.precision=fp8"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(get_preset("gridnav"), overrides=["optim.lr_vision=1e-4"])
    f = tmp_path / "c.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(yaml_path=f) == cfg


def test_every_key_is_documented_and_doc_is_current():
    from pathlib import Path

    from vlmtrain.tools.config_doc import render_config_doc

    rendered = render_config_doc()
    missing = [k for k in valid_keys() if f"`{k}`" not in rendered]
    assert not missing, f"keys missing from the config reference: {missing}"
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert doc == rendered, "docs/config.md is stale: python -m vlmtrain.tools.config_doc > docs/config.md"


HF = ["model.family=qwen2_5_vl", "model.path=models/not_made_yet"]  # paths are checked at build time


@pytest.mark.parametrize("overrides, match", [
    (["model.family=llava"], "needs model.path"),
    (["model.lora=true"], "needs an HF model.family"),
    (HF + ["data.sources=[{name: a, format: llava_json, pth: x.json}]"], r"data\.sources\[0\]\.pth.*did you mean 'path'"),
    (HF + ["data.sources=[{name: a%50, percent: 20, format: llava_json, path: x.json}]"], "percent once"),
    (HF + ["data.sources=[{name: a, path: x.json}, {name: a, path: y.json}]"], "used twice"),
    (HF + ["data.sources=[{name: r2r, format: internvla_n1, path: d}]"], "InternVLA-N1 dataset name"),
    (HF + ["data.sources=[{name: a, format: parquet, path: d}]"], r"data\.sources\[0\]\.format"),
    (HF + ["train.grad_checkpointing=[decoder]"], "unknown part"),
    (HF + ["model.lora_parts=[]", "model.lora=true"], "lora_parts is empty"),
])
def test_hf_family_and_sources_are_validated(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig(), overrides=overrides)


def test_every_family_reads_every_format():
    """One data path: the composed model takes the same sources as the HF families."""
    for fmt in ("llava_json", "streamvln", "lerobot_vln"):
        assert load_config(RunConfig(), overrides=[f"data.format={fmt}"]).data.format == fmt
    mixed = load_config(RunConfig(), overrides=["data.sources=[{name: a%50, format: llava_json, path: x.json}]"])
    assert mixed.model.family == "composed" and mixed.data.sources[0].format == "llava_json"


def test_sources_from_yaml(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: {family: auto, path: m, lora: true}\n"
                 "data:\n  sources:\n    - {name: gridnav%50, format: lerobot_vln, path: g}\n"
                 "    - {name: chat, path: c.json, percent: 250}\n")
    cfg = load_config(RunConfig(), yaml_path=f)
    assert [(s.name, s.format, s.percent) for s in cfg.data.sources] == [
        ("gridnav%50", "lerobot_vln", 100.0), ("chat", "llava_json", 250.0)]
    assert load_config(yaml_path=_round_trip(cfg, tmp_path)) == cfg


def _round_trip(cfg, tmp_path):
    path = tmp_path / "saved.yaml"
    path.write_text(to_yaml(cfg))
    return path
