"""Training runs with a spatial branch (model.spatial_encoder, the JanusVLN recipe), with the defaults a
user gets (torch's threads, features.cache=auto):

- the branch's encoder runs on each distinct frame once: in the second epoch 0 times (hit rate 1.0),
  and the cached features are the recomputed ones (rounded to the cache's bf16, as stored);
- resuming from a checkpoint ends with the same bits as the uninterrupted run (projector included);
- ``vlmtrain export --merged`` / ``--adapter`` of a Qwen2.5-VL LoRA run reload with the branch and give
  the trained model's logits on a fixed batch;
- ``vlmtrain cache`` fills the branch's cache, and ``plan`` counts its parameters and FLOPs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmtrain.cli import main
from vlmtrain.config import save_config
from vlmtrain.features.cache import FeatureCache
from vlmtrain.features.fingerprint import fingerprint_modules, frame_keys
from vlmtrain.models.export import load_adapter_export
from vlmtrain.models.registry import load_spatial_model
from vlmtrain.models.spatial import SpatialVLM, load_branch
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
from vlmtrain.models.tiny_spatial import save_tiny_dinov2
from vlmtrain.train.build import build_batches, build_model_and_data
from vlmtrain.train.export_run import load_trained_model
from vlmtrain.features.source import FeatureSource


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dinov2", seed=0)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """6 GridNav episodes (~217 decision samples): an epoch is a dozen steps of 16."""
    from vlmtrain.envs.gridnav.generate import write_dataset

    return write_dataset(tmp_path_factory.mktemp("gridnav6") / "train", episodes=6, seed=0, workers=1)


def _composed(root: Path, out: Path, dino: Path, **train):
    from vlmtrain.presets import gridnav_tiny

    cfg = gridnav_tiny()
    cfg.data.root, cfg.data.gridnav_episodes = str(root), 0
    cfg.model.spatial_encoder = str(dino)
    cfg.train.progress, cfg.train.log_every, cfg.train.batch_size = False, 1, 16
    for k, v in train.items():
        setattr(cfg.train, k, v)
    cfg.output_dir = str(out)
    return cfg


def _train(cfg, path: Path) -> None:
    save_config(cfg, path)
    assert main(["train", "--config", str(path)]) == 0


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_spatial_encoder_runs_once_per_distinct_frame(small_root, dino, tmp_path):
    """Two epochs with the cache filling online: each step runs the encoder on exactly the frames no
    earlier step showed (derived here from the run's own plan), so the second epoch runs it only on
    the few frames the first epoch's dropped remainder held, and steps of seen frames hit 1.0. A run
    after ``vlmtrain cache`` runs it 0 times from its first step. The cached features are the ones
    the trained model's encoder computes now, rounded to bf16 as stored."""
    cfg = _composed(small_root, tmp_path / "run", dino, epochs=2.0)
    _train(cfg, tmp_path / "run.yaml")
    logged = [m for m in _metrics(tmp_path / "run") if "spatial/frames_encoded_per_sample" in m]

    model, data = build_model_and_data(cfg, tmp_path / "run")
    batches, _ = build_batches(cfg, data, model, FeatureSource(), 0, len(logged))
    seen: set[str] = set()
    expected = []
    for _ in logged:
        micro = batches.next()
        keys = {k for b in micro for k in frame_keys(b.pixels)}
        expected.append((round(len(keys - seen) / sum(b.num_samples for b in micro), 3), len(keys - seen)))
        seen |= keys
    batches.close()
    assert [m["spatial/frames_encoded_per_sample"] for m in logged] == [e for e, _ in expected]
    second = [m for m, (_, new) in zip(logged, expected) if m["train/epoch"] > 1.0 + 1e-9]
    assert second and sum(new for m, (_, new) in zip(logged, expected) if m in second) < len(seen) / 5
    for m, (_, new) in zip(logged, expected):
        if new == 0:
            assert m["spatial/cache_hit_rate"] == 1.0 and m["spatial/frames_encoded_per_sample"] == 0

    trained = load_trained_model(tmp_path / "run")
    assert isinstance(trained, SpatialVLM)
    pixels = data.frames[torch.arange(0, 40)]
    with FeatureCache(tmp_path / "run" / "feature_cache" / "spatial",
                      fingerprint_modules(trained.spatial.encoder), trained.spatial.identity()) as cache:
        hits, cached = cache.lookup(frame_keys(pixels))
    assert bool(hits.all())
    fresh = trained.spatial.encode(trained.spatial.prepare(pixels)).to(torch.bfloat16).float()
    assert torch.equal(cached, fresh)

    warm = _composed(small_root, tmp_path / "warm", dino, steps=8)
    save_config(warm, tmp_path / "warm.yaml")
    assert main(["cache", "--config", str(tmp_path / "warm.yaml")]) == 0
    _train(warm, tmp_path / "warm.yaml")
    steps = [m for m in _metrics(tmp_path / "warm") if "spatial/frames_encoded_per_sample" in m]
    assert len(steps) == 8
    assert all(m["spatial/frames_encoded_per_sample"] == 0 and m["spatial/cache_hit_rate"] == 1.0 for m in steps)


def test_resume_with_the_spatial_branch_is_exact(small_root, dino, tmp_path):
    cfg = _composed(small_root, tmp_path / "a", dino, steps=10, ckpt_every=5, keep_checkpoints=10)
    _train(cfg, tmp_path / "a.yaml")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000010")
    shutil.rmtree(tmp_path / "b" / "model")
    cfg.output_dir, cfg.train.resume = str(tmp_path / "b"), True
    _train(cfg, tmp_path / "b.yaml")
    a = load_file(tmp_path / "a" / "checkpoints" / "step-0000010" / "trained.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-0000010" / "trained.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("spatial.projector.") for k in a)
    assert not any(k.startswith("spatial.encoder.") for k in a)  # the frozen encoder is never checkpointed
    assert all(torch.equal(a[k], b[k]) for k in a)


def _logits(model, batch) -> torch.Tensor:
    """Logits at the labelled positions of one micro-batch (what ``forward_lm`` computes them on)."""
    out = []
    handle = model.output_embeddings().register_forward_hook(lambda _m, _i, o: out.append(o.detach()))
    try:
        with torch.no_grad():
            from vlmtrain.train.step import micro_loss

            micro_loss(model, batch, torch.device("cpu"), FeatureSource())
    finally:
        handle.remove()
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in out])


def test_exports_reload_with_the_branch_and_the_same_logits(small_root, dino, tmp_path, qwen_lora_cfg):
    qwen = save_tiny_qwen_vl(tmp_path / "qwen", family="qwen2_5_vl", seed=0)
    cfg = qwen_lora_cfg(qwen, small_root, tmp_path / "run")
    cfg.model.spatial_encoder = str(dino)
    cfg.train.steps, cfg.train.log_every = 4, 1
    _train(cfg, tmp_path / "run.yaml")
    assert main(["export", str(tmp_path / "run"), "--merged", str(tmp_path / "merged"),
                 "--adapter", str(tmp_path / "adapter")]) == 0

    trained = load_trained_model(tmp_path / "run")
    _, data = build_model_and_data(cfg, tmp_path / "run")
    batches, _ = build_batches(cfg, data, trained, FeatureSource(), 0, 1)
    batch = batches.next()[0]
    batches.close()
    want = _logits(trained, batch)

    merged = load_spatial_model(tmp_path / "merged", frame_size=cfg.model.frame_size)
    adapter = load_branch(load_adapter_export(qwen, tmp_path / "adapter"), tmp_path / "adapter").eval()
    # Merging LoRA into the base weights rounds differently (as in tests/models/test_lora_export.py:
    # observed up to 1.2e-5 on logits around +-1); the adapter export computes exactly as training.
    for again, rtol, atol in ((merged, 1e-4, 3e-5), (adapter, 1e-5, 1e-5)):
        batch.prepared = False  # each model prepares its own encoder inputs
        torch.testing.assert_close(_logits(again, batch), want, rtol=rtol, atol=atol)
    meta = json.loads((tmp_path / "merged" / "spatial" / "spatial.json").read_text())
    assert meta["settings"]["weight"] == 0.2 and meta["settings"]["encoder_path"] == str(dino.resolve())


def test_cache_and_plan_count_the_branch(small_root, dino, tmp_path, capsys):
    cfg = _composed(small_root, tmp_path / "run", dino, steps=6)
    save_config(cfg, tmp_path / "c.yaml")
    capsys.readouterr()
    assert main(["cache", "--config", str(tmp_path / "c.yaml")]) == 0
    filled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert filled["cache_dir"] is None  # the composed vision encoder trains: no main cache
    assert filled["spatial_encoded"] == filled["distinct_frames"] == filled["spatial_entries"] > 0

    assert main(["plan", "--config", str(tmp_path / "c.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, _ = build_model_and_data(cfg, tmp_path / "run")
    spatial = [p for n, p in model.named_parameters() if n.startswith("spatial.")]
    assert report["parameters"]["spatial"]["total"] == sum(p.numel() for p in spatial)
    assert report["parameters"]["spatial"]["trainable"] == sum(p.numel() for p in spatial if p.requires_grad) > 0
    plain = json.loads(json.dumps(report))  # the same config without the branch plans fewer FLOPs
    cfg.model.spatial_encoder = ""
    cfg.output_dir = str(tmp_path / "plain")
    save_config(cfg, tmp_path / "p.yaml")
    assert main(["plan", "--config", str(tmp_path / "p.yaml"), "--json"]) == 0
    without = json.loads(capsys.readouterr().out)
    assert plain["compute"]["flops_per_step"] > without["compute"]["flops_per_step"]
    assert "spatial" in plain["feature_cache"]


def test_concat_fusion_trains_with_both_caches(small_root, dino, tmp_path):
    """concat on the composed model with a frozen vision encoder: the main cache holds vision-encoder
    features (split: the projector reads them joined with the branch's), the branch has its own
    cache, both fill online, and the loss falls."""
    cfg = _composed(small_root, tmp_path / "run", dino, steps=24, freeze_vision=True)
    cfg.model.spatial_fusion = "concat"
    _train(cfg, tmp_path / "run.yaml")
    logged = [m for m in _metrics(tmp_path / "run") if "loss/train" in m]
    assert logged[-1]["loss/train"] < 0.7 * logged[0]["loss/train"]
    assert max(m["cache/hit_rate"] for m in logged) > 0 and max(m["spatial/cache_hit_rate"] for m in logged) > 0
    meta = json.loads((tmp_path / "run" / "feature_cache" / "meta.json").read_text())
    assert meta["preprocess"]["producer"] == "vision"  # split: pre-projector features
    assert (tmp_path / "run" / "model" / "spatial" / "spatial.json").is_file()
