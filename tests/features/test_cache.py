"""Feature cache on a tiny real composed VLM (SigLIP encoder + pixel-shuffle projector)."""

from __future__ import annotations

import copy
import json
import sqlite3
import threading

import pytest
import torch

from vlmtrain.config import FeaturesConfig, ModelConfig
from vlmtrain.features.cache import (
    CacheMismatchError, FeatureCache, cache_enabled, fingerprint_modules, frame_keys,
)
from vlmtrain.features.source import (
    FeatureCacheUnavailable, cache_bytes_per_frame, cache_size_problem, open_feature_source,
)
from vlmtrain.models.composed import PIXEL_MEAN, PIXEL_STD, build_composed_vlm

IMAGE = 32
BF16_TOL = dict(atol=1e-2, rtol=2**-8)  # bf16 keeps 8 significant bits


def _preprocess(size: int = IMAGE) -> dict:
    return {"frame_size": [size, size], "pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD, "input": "uint8"}


@pytest.fixture(scope="module")
def model(chat_tokenizer):
    torch.manual_seed(0)
    mcfg = ModelConfig()
    for name, value in dict(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64, patch_size=8,
                            pixel_shuffle=2, lm_hidden=32, lm_layers=1, lm_heads=2, lm_kv_heads=2,
                            lm_intermediate=64, vocab_size=64, max_position=64).items():
        setattr(mcfg, name, value)
    return build_composed_vlm(mcfg, IMAGE, chat_tokenizer, max_frame_slots=4).eval()


def _frames(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, IMAGE, IMAGE), generator=g, dtype=torch.uint8)


def _open(root, model, **kw) -> FeatureCache:
    fp = fingerprint_modules(model.vision, model.projector)
    return FeatureCache(root, fp, kw.pop("preprocess", _preprocess()), **kw)


def _encode(model, px: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_images(model.prepare_frames(px))


@pytest.mark.parametrize("dtype,store", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cached_equals_recomputed_rounded(tmp_path, model, dtype, store):
    px = _frames(6, seed=1)
    keys = frame_keys(px)
    ref = _encode(model, px)
    with _open(tmp_path / "c", model, dtype=dtype) as cache:
        hits, none = cache.lookup(keys)
        assert not hits.any() and none.shape == (0, 0, 0)  # before any put
        assert cache.put(keys, ref) == 6
        hits, pending = cache.lookup(keys)  # rows still in memory (shard_size 4096)
        assert hits.all() and not list((tmp_path / "c").glob("shard-*"))
        cache.flush()
        hits, hit = cache.lookup(keys)  # now read back from the shard file
    assert hits.all()
    assert ref.shape == (6, 4, 32) and hit.dtype == torch.float32 and pending.dtype == torch.float32
    torch.testing.assert_close(hit, ref.to(store).float(), rtol=0, atol=0)
    torch.testing.assert_close(pending, hit, rtol=0, atol=0)  # pending and on-disk rows read the same
    torch.testing.assert_close(hit, ref, **BF16_TOL)
    assert not torch.equal(hit, ref)  # the cache really rounds: the test can tell stored from raw fp32


def test_hit_rate_and_stats(tmp_path, model):
    old, new = _frames(5, seed=2), _frames(3, seed=3)
    old_keys, new_keys = frame_keys(old), frame_keys(new)
    with _open(tmp_path / "c", model, shard_size=4) as cache:
        hits, _ = cache.lookup(old_keys)
        assert hits.tolist() == [False] * 5
        assert cache.put(old_keys, _encode(model, old)) == 5  # one full shard of 4 written, 1 pending
        hits, _ = cache.lookup(old_keys)
        assert hits.tolist() == [True] * 5
        mixed = torch.cat([new[:1], old[1:4], new[1:], old[:1]])  # 3 new + 4 old, interleaved
        mixed_keys = frame_keys(mixed)
        hits, feats = cache.lookup(mixed_keys)
        assert hits.tolist() == [False, True, True, True, False, False, True]
        torch.testing.assert_close(feats, _encode(model, torch.cat([old[1:4], old[:1]])).bfloat16().float(),
                                   rtol=0, atol=0)
        misses = [k for k, hit in zip(mixed_keys, hits.tolist()) if not hit]
        assert misses == [new_keys[0], new_keys[1], new_keys[2]]
        assert cache.put(misses, _encode(model, new)) == 3
        s = cache.stats
        assert (s["hits"], s["misses"], s["entries"]) == (9, 8, 8)
        assert s["hit_rate"] == pytest.approx(9 / 17)
        assert s["bytes"] > 0  # two full shards of 4 rows are on disk
        assert len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 2
        hits, out = cache.lookup(mixed_keys)
        assert hits.all()
        torch.testing.assert_close(out, _encode(model, mixed).bfloat16().float(), rtol=0, atol=0)


def test_duplicate_keys_stored_once_and_looked_up_repeatedly(tmp_path, model):
    px = _frames(2, seed=4)
    batch = torch.stack([px[0], px[1], px[0], px[0]])
    keys = frame_keys(batch)
    with _open(tmp_path / "c", model) as cache:
        assert cache.put(keys, _encode(model, batch)) == 2
        assert cache.stats["entries"] == 2
        hits, out = cache.lookup(keys)
        assert hits.all() and out.shape == (4, 4, 32)
        torch.testing.assert_close(out[2], out[0], rtol=0, atol=0)
        torch.testing.assert_close(out[3], out[0], rtol=0, atol=0)
        assert not torch.equal(out[0], out[1])


def test_reopen_reads_same_features_from_disk(tmp_path, model):
    px = _frames(7, seed=5)
    keys = frame_keys(px)
    with _open(tmp_path / "c", model, shard_size=3) as cache:
        cache.put(keys, _encode(model, px))
        _, first = cache.lookup(keys)
    torch.testing.assert_close(first, _encode(model, px).bfloat16().float(), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == [
        "shard-000000.safetensors", "shard-000001.safetensors", "shard-000002.safetensors"]  # 3 + 3 + 1 rows
    reopened = _open(tmp_path / "c", model, shard_size=3)
    hits, feats = reopened.lookup(keys[::-1])  # any order, across shards
    assert hits.all()
    torch.testing.assert_close(feats, first.flip(0), rtol=0, atol=0)
    assert reopened.stats["entries"] == 7 and reopened.feature_shape == (4, 32)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["feature_shape"] == [4, 32] and meta["dtype"] == "bf16"
    reader = _open(tmp_path / "c", model, read_only=True)
    torch.testing.assert_close(reader.lookup(keys)[1], first, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="read-only"):
        reader.put(keys[:1], first[:1])
    reopened.close(), reader.close()


def test_changed_weight_or_preprocessing_is_refused(tmp_path, model):
    root = tmp_path / "c"
    with _open(root, model) as cache:
        px = _frames(2, seed=6)
        cache.put(frame_keys(px), _encode(model, px))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        fc1 = next(p for n, p in changed.vision.named_parameters() if n.endswith("layers.0.mlp.fc1.weight"))
        fc1[0, 0] += 1e-3  # one element of one weight
    assert fingerprint_modules(changed.vision, changed.projector) != fingerprint_modules(model.vision, model.projector)
    with pytest.raises(CacheMismatchError, match="fingerprint") as err:
        _open(root, changed)
    assert "preprocessing parameters differ" not in str(err.value)
    with pytest.raises(CacheMismatchError, match=r"preprocessing.*frame_size") as err:
        _open(root, model, preprocess=_preprocess(16))
    assert "fingerprint differs" not in str(err.value)
    with pytest.raises(CacheMismatchError, match="dtype"):
        _open(root, model, dtype="fp16")
    # The language model is not a feature producer: training it leaves the fingerprint alone.
    with torch.no_grad():
        changed_lm = copy.deepcopy(model)
        next(changed_lm.lm.parameters()).add_(1.0)
    assert fingerprint_modules(changed_lm.vision, changed_lm.projector) == fingerprint_modules(
        model.vision, model.projector)
    # rebuild=True moves the old cache aside (kept) and starts empty.
    with _open(root, changed, rebuild=True) as fresh:
        assert fresh.stats["entries"] == 0
        assert not fresh.lookup(frame_keys(_frames(2, seed=6)))[0].any()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith("c.stale-")]
    assert len(stale) == 1 and (stale[0] / "meta.json").exists()


def test_cache_enabled_switches_off_for_trained_vision():
    on, reason = cache_enabled({"llm"}, ())
    assert on and "on" in reason
    off, reason = cache_enabled({"vision", "projector", "llm"}, ())
    assert not off and "vision" in reason and "trains" in reason
    off, reason = cache_enabled({"llm"}, ("llm", "vision"))
    assert not off and "LoRA" in reason and "vision" in reason
    off, reason = cache_enabled({"projector", "llm"}, None)
    assert not off and "projector" in reason and "train.freeze_projector=true" in reason
    on, _ = cache_enabled({"projector", "llm"}, None, producer_parts=("vision",))
    assert on


def test_crash_mid_shard_leaves_index_consistent(tmp_path, model):
    root = tmp_path / "c"
    px = _frames(6, seed=7)
    keys = frame_keys(px)
    with torch.no_grad():
        feats = model.encode_images(model.prepare_frames(px))
    cache = _open(root, model, shard_size=4)
    cache.put(keys, feats)  # 4 rows reach a shard, 2 stay pending: then the process "dies"
    (root / "shard-000001.safetensors.tmp-999").write_bytes(b"half a shard")  # interrupted write
    del cache
    again = _open(root, model, shard_size=4)
    hits, got = again.lookup(keys)
    assert hits.tolist() == [True] * 4 + [False] * 2
    torch.testing.assert_close(got, feats[:4].bfloat16().float(), rtol=0, atol=0)
    assert not list(root.glob("*.tmp-*"))
    db = sqlite3.connect(root / "index.sqlite")
    shards = dict(db.execute("SELECT id, file FROM shards"))
    for shard, n in db.execute("SELECT shard, COUNT(*) FROM entries GROUP BY shard"):
        assert (root / shards[shard]).exists() and n <= 4
    db.close()
    again.close()


def _pending_cache(root, model, seed: int) -> tuple[FeatureCache, list[str], torch.Tensor]:
    """A cache holding 3 fresh frames' features not yet flushed to a shard, their keys and features."""
    px = _frames(3, seed=seed)
    keys, feats = frame_keys(px), _encode(model, px)
    cache = _open(root, model)
    cache.put(keys, feats)
    return cache, keys, feats


def test_crash_before_rename_indexes_nothing(tmp_path, model, monkeypatch):
    root = tmp_path / "c"
    cache, keys, _ = _pending_cache(root, model, seed=12)

    def crash(*args):
        raise KeyboardInterrupt("killed while the shard was still a temp file")

    monkeypatch.setattr("vlmtrain.features.cache.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.flush()
    monkeypatch.undo()
    with _open(root, model) as again:
        assert not again.lookup(keys)[0].any() and again.stats["entries"] == 0
        assert not list(root.glob("shard-*"))  # the half-written temp file was cleaned up


def test_shard_renamed_but_not_indexed_is_adopted(tmp_path, model, monkeypatch):
    root = tmp_path / "c"
    cache, keys, feats = _pending_cache(root, model, seed=8)

    def crash(*args):
        raise KeyboardInterrupt("killed between rename and index commit")

    monkeypatch.setattr(cache, "_index_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.flush()
    assert (root / "shard-000000.safetensors").exists()
    with _open(root, model) as again:
        hits, got = again.lookup(keys)
        assert hits.all()
        torch.testing.assert_close(got, feats.bfloat16().float(), rtol=0, atol=0)


def test_same_key_twice_stores_one_row(tmp_path, model):
    px = _frames(2, seed=9)
    keys = frame_keys(px)
    with torch.no_grad():
        feats = model.encode_images(model.prepare_frames(px))
    with _open(tmp_path / "c", model) as cache:
        assert cache.put([keys[0], keys[0]], feats[[0, 0]]) == 1  # repeated within one call
        assert cache.put(keys[:1], feats[:1]) == 0  # pending already
        cache.flush()
        assert cache.put(keys, feats) == 1  # indexed already; only the new one
        cache.flush()
        assert cache.stats["entries"] == 2
    db = sqlite3.connect(tmp_path / "c" / "index.sqlite")
    assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 2
    assert db.execute("SELECT SUM(rows) FROM shards").fetchone()[0] == 2
    db.close()


def test_frame_keys_are_content_hashes():
    px = _frames(3, seed=10)
    keys = frame_keys(px)
    assert len(set(keys)) == 3 and frame_keys(px.clone()) == keys
    assert frame_keys(torch.stack([px[1], px[1]])) == [keys[1], keys[1]]
    flipped = px.clone()
    flipped[0, 0, 0, 0] ^= 1  # one bit of one pixel
    assert frame_keys(flipped)[0] != keys[0]
    same_bytes = px[:1].reshape(1, 3, IMAGE * 2, IMAGE // 2)  # equal bytes, other frame size
    assert frame_keys(same_bytes)[0] != keys[0]


def test_concurrent_reader_thread_and_writer(tmp_path, model):
    px = _frames(12, seed=11)
    keys = frame_keys(px)
    with torch.no_grad():
        feats = model.encode_images(model.prepare_frames(px))
    errors = []
    with _open(tmp_path / "c", model, shard_size=2) as cache:
        def read():
            try:
                for _ in range(30):
                    hits, got = cache.lookup(keys)
                    assert got.shape[0] == int(hits.sum())
            except Exception as e:  # surfaced below
                errors.append(e)

        reader = threading.Thread(target=read)
        reader.start()
        for i in range(12):
            cache.put(keys[i:i + 1], feats[i:i + 1])
        reader.join()
        assert not errors and cache.lookup(keys)[0].all()



def test_auto_cache_refuses_a_cache_over_the_size_limit(tmp_path, model):
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)  # a frozen encoder and projector: the cache is allowed
    try:
        per_frame = cache_bytes_per_frame(model, split=False)
        assert per_frame == model.tokens_per_frame() * model.lm.config.hidden_size * 2  # K x D at 2 bytes
        limit_gib = 10 * per_frame / 2 ** 30  # room for 10 frames
        fcfg = FeaturesConfig(cache="auto", max_gib=limit_gib)
        assert cache_size_problem(fcfg, model, False, tmp_path, frames=10) is None
        why = cache_size_problem(fcfg, model, False, tmp_path, frames=11)
        assert why is not None and "11 frames" in why and "features.max_gib" in why
        assert open_feature_source(fcfg, model, tmp_path / "a", frames=11).uses_cache is False  # auto: without
        assert open_feature_source(fcfg, model, tmp_path / "b", frames=10).uses_cache is True
        with pytest.raises(FeatureCacheUnavailable, match="features.max_gib"):
            open_feature_source(FeaturesConfig(cache="on", max_gib=limit_gib), model, tmp_path / "c", frames=11)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])
