"""``vlmtrain bench`` and ``vlmtrain cache`` on the tiny GridNav preset: the bench line holds every
figure the issue names, computed from the run (not asserted speeds: those live in docs/benchmarks.md);
the cache command fills a cache that training then reads without encoding a frame."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtrain.cli import main
from vlmtrain.config import save_config
from vlmtrain.tools.bench import bench
from vlmtrain.train.loop import train

BENCH_KEYS = {"samples_per_s", "tokens_per_s", "tgs", "tflops", "padding_efficiency", "data_wait_pct",
              "frames_encoded_per_sample", "cache_hit_rate", "step_s", "breakdown_s", "lm_floor_step_s",
              "step_over_floor", "images_per_sample", "machine", "config"}


def cached_cfg(tiny_cfg, packing: bool = True):
    """The tiny preset with a frozen vision encoder, the feature cache and (by default) packing."""
    tiny_cfg.train.freeze_vision = True
    tiny_cfg.features.cache = "auto"
    tiny_cfg.data.packing = packing
    tiny_cfg.data.max_pack_tokens = 128
    return tiny_cfg


def test_bench_reports_floor_breakdown_and_naive_ratio(tiny_cfg):
    cfg = cached_cfg(tiny_cfg)
    record = bench(cfg, warmup=1, steps=3, compare="naive")
    assert BENCH_KEYS <= set(record)
    assert set(record["breakdown_s"]) == {"data", "vision", "lm_forward", "backward", "optimizer"}
    # Warm cache (filled before measuring): nothing encoded, every lookup a hit.
    assert record["cache_fill"]["encoded"] == record["cache_fill"]["distinct_frames"] > 0
    assert record["frames_encoded_per_sample"] == 0.0 and record["cache_hit_rate"] == 1.0
    assert record["config"]["split_cache"]  # the projector trains: vision features cached, projector runs
    assert record["lm_floor_step_s"] > 0 and record["step_over_floor"] == pytest.approx(
        record["step_s"] / record["lm_floor_step_s"], rel=1e-2)
    naive = record["naive"]
    # Naive: every image slot encoded (no de-duplication, no cache), padded rows.
    assert naive["frames_encoded_per_sample"] == naive["images_per_sample"] > 1
    assert naive["padding_efficiency"] < record["padding_efficiency"]
    assert record["speedup_samples_per_s"] == pytest.approx(record["samples_per_s"] / naive["samples_per_s"], rel=1e-2)
    assert json.loads((Path(cfg.output_dir) / "bench.json").read_text())["step_s"] == record["step_s"]


def test_bench_without_cache_encodes_unique_frames_only(tiny_cfg):
    record = bench(tiny_cfg, warmup=0, steps=2)
    assert "cache_hit_rate" not in record and not record["config"]["feature_cache"]
    # De-duplicated: frames encoded per sample = unique frames per sample < images shown per sample.
    assert record["frames_encoded_per_sample"] == record["unique_frames_per_sample"] < record["images_per_sample"]


def test_cache_command_fills_cache_that_training_reads(tiny_cfg, tmp_path, capsys):
    cfg = cached_cfg(tiny_cfg, packing=False)
    cfg.features.cache_dir = str(tmp_path / "features")
    cfg.train.steps, cfg.train.log_every = 4, 4
    config = tmp_path / "run.yaml"
    save_config(cfg, config)
    assert main(["cache", "--config", str(config)]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["encoded"] == first["distinct_frames"] == first["entries"] > 0 and first["split"]
    assert main(["cache", "--config", str(config)]) == 0  # again: everything already there
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["encoded"] == 0 and second["already_cached"] == first["distinct_frames"]
    train(cfg)
    last = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["cache/hit_rate"] == 1.0 and last["vision/frames_encoded_per_sample"] == 0.0


def test_cache_command_refuses_a_trained_encoder(tiny_cfg, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    save_config(tiny_cfg, config)  # vision trains
    assert main(["cache", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "vision part trains" in err and "train.freeze_vision=true" in err


def test_compare_spatial_measures_without_cold_and_warm(tiny_cfg, tmp_path, capsys):
    """``bench --compare spatial``: the recipe without its spatial branch, with it uncached (the encoder
    on every unique frame) and warm (its cache filled first: the encoder runs 0 times), each the
    ratio of its step time to the step without the branch."""
    from vlmtrain.models.tiny_spatial import save_tiny_dinov2

    dino = save_tiny_dinov2(tmp_path / "dino")
    args = ["bench", "--preset", "gridnav_tiny", f"output_dir={tmp_path / 'b'}", f"data.root={tiny_cfg.data.root}",
            "data.gridnav_episodes=0", "train.progress=false", f"model.spatial_encoder={dino}",
            "--compare", "spatial", "--steps", "4", "--warmup", "1"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    record = json.loads(out[-1])
    table = out[-5:-1]
    assert table[0].split()[:3] == ["spatial", "branch", "step"] and [t.split()[0] for t in table[1:]] == list(
        ("without", "cold", "warm"))
    assert "spatial_frames_encoded_per_sample" not in record["without"]
    assert record["cold"]["spatial_frames_encoded_per_sample"] == record["cold"]["unique_frames_per_sample"] > 0
    assert record["warm"]["spatial_frames_encoded_per_sample"] == 0
    assert record["warm"]["spatial_cache_hit_rate"] == 1.0
    assert record["warm"]["cache_fill"]["spatial_encoded"] > 0
    for mode in ("cold", "warm"):
        assert record[f"{mode}_over_without"] == round(record[mode]["step_s"] / record["without"]["step_s"], 3)

    assert main(args[:-6] + ["model.spatial_encoder=", "--compare", "spatial"]) == 2  # `key=` empties it
    assert "--compare spatial needs model.spatial_encoder" in capsys.readouterr().err
