"""``vlmtrain bench --compare hf-trainer`` on a small copy of its workload: the stock recipe tokenizes
and labels every sample exactly as vlmtrain does (one loss definition), both runs train, and the
comparison reports both speeds, their ratio and held-out losses."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("accelerate")

from vlmtrain.config import load_config
from vlmtrain.data.conversation import IMAGE_PLACEHOLDER
from vlmtrain.models.protocol import Turn
from vlmtrain.models.registry import load_adapter
from vlmtrain.models.tiny_qwen import TEST_SIZE
from vlmtrain.tools.bench_compare import compare_hf_trainer, format_compare
from vlmtrain.tools.hf_trainer_recipe import StockVLNDataset, check_supported
from vlmtrain.tools.workload import write_vln_workload
from vlmtrain.config import ConfigError

ROLE = {"system": "system", "human": "user", "gpt": "assistant"}


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    # Test-size model, 32 px frames (16 visual tokens each, as the bench's 112 px frames at patch 14).
    return write_vln_workload(tmp_path_factory.mktemp("wl"), episodes=2, heldout_episodes=1, size=32,
                              model_size=TEST_SIZE)


def test_workload_is_the_vln_layout(workload):
    records = json.loads(workload.annotations.read_text())
    assert len(records) == workload.samples == workload.frames  # one frame per decision
    for r in records:
        human = r["conversations"][1]["value"]
        assert 1 <= len(r["images"]) <= 9 and human.count(IMAGE_PLACEHOLDER) == len(r["images"])
        t = int(r["id"].split("_t")[1])
        assert r["images"][-1].endswith(f"_t{t:03d}.png")  # the current frame last
    refs = [p for r in records for p in r["images"]]
    assert len(refs) / len(set(refs)) > 3  # frames are shared between decisions


def test_stock_recipe_tokenizes_and_labels_as_vlmtrain(workload):
    stock = StockVLNDataset(workload.annotations, workload.model, 32)
    adapter = load_adapter("qwen2_5_vl", workload.model, 32)
    records = json.loads(workload.annotations.read_text())
    for i in (0, 3, len(records) - 1):
        row = stock[i]
        turns = [Turn(ROLE[t["from"]], t["value"]) for t in records[i]["conversations"]]
        ours = adapter.encode_conversation(turns)
        assert row["input_ids"].tolist() == ours.input_ids
        assert row["labels"].tolist() == ours.labels  # the answer and its <|im_end|>, nothing else
        assert row["image_grid_thw"].shape[0] == len(records[i]["images"])
        assert (row["labels"] != -100).sum() >= 2


def test_unsupported_configs_are_config_errors(workload):
    cfg = load_config(None, workload.config, ["model.family=idefics3"])
    with pytest.raises(ConfigError, match="model.family"):
        check_supported(cfg)
    cfg = load_config(None, workload.config, ["data.format=lerobot_vln"])
    with pytest.raises(ConfigError, match="llava_json"):
        check_supported(cfg)


@pytest.mark.slow
def test_compare_runs_both_and_reports_the_ratio(workload, tmp_path):
    cfg = load_config(None, workload.config, [f"output_dir={tmp_path / 'run'}", "train.log_every=5"])
    record = compare_hf_trainer(cfg, pairs=1, epochs=1.0, heldout=str(workload.root / "data" / "heldout.json"))
    pair = record["pairs"][0]
    n = workload.samples
    assert pair["hf_trainer"]["samples"] >= n - cfg.train.batch_size
    assert 0.9 * n <= pair["vlmtrain"]["samples"] <= n
    for side in ("hf_trainer", "vlmtrain"):
        assert pair[side]["seconds"] > 0 and pair[side]["samples_per_s"] > 0
        assert math.isfinite(pair[side]["heldout_loss"]) and 0 < pair[side]["heldout_loss"] < 10
        assert pair[side]["last_train_loss"] is not None
    assert pair["speedup"] == pytest.approx(pair["vlmtrain"]["samples_per_s"] / pair["hf_trainer"]["samples_per_s"],
                                            rel=1e-2)
    assert record["median_speedup"] == pair["speedup"]
    assert (tmp_path / "run" / "compare" / "compare.json").is_file()
    assert "median speed-up" in format_compare(record)
    # Each side trained and saved a model that the held-out loss was computed on.
    assert (tmp_path / "run" / "compare" / "vlmtrain_0" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "compare" / "hf_trainer_0" / "model" / "config.json").is_file()
