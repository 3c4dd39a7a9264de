"""Validation during training: the held-out split is by episode, val/* metrics equal independently
computed ones, eval/* closed-loop metrics run on split "val", checkpoints/best keeps the best weights
(never rotated, atomic, resumed), early stopping, and `vlmtrain eval` takes the best model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlmtrain.config import ConfigError, SourceConfig, load_config
from vlmtrain.data.dataset import load_data, open_indexes
from vlmtrain.data.errors import ErrorPolicy
from vlmtrain.data.index import default_index_root
from vlmtrain.data.loader import collate
from vlmtrain.data.mixture import held_out_episodes
from vlmtrain.envs.gridnav.generate import write_dataset
from vlmtrain.models.protocol import IGNORE_INDEX
from vlmtrain.presets import gridnav_tiny
from vlmtrain.train.build import build_model_and_data, build_val_data, seed_everything
from vlmtrain.train.checkpoint import recover_best
from vlmtrain.train.evaluate import evaluate_run
from vlmtrain.train.loop import train
from vlmtrain.train.step import batch_loss
from vlmtrain.train.validate import better_is_lower, validate_samples, validation_set

pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _episodes_of(data) -> set[tuple[int, int]]:
    rows = data.samples.rows
    return set(zip(data.sample_source.tolist(), data.samples.store.column(rows, "episode").tolist()))


def test_held_out_episodes_is_seeded_whole_episodes_and_bounded():
    episodes = np.repeat(np.arange(10), 7)  # 10 episodes of 7 decisions
    held = held_out_episodes(episodes, 0.2, seed=3, name="r2r")
    assert held.sum() == 14 and len(set(episodes[held])) == 2  # 2 whole episodes
    assert not set(episodes[held]) & set(episodes[~held])
    assert np.array_equal(held, held_out_episodes(episodes, 0.2, seed=3, name="r2r"))  # deterministic
    assert not np.array_equal(held, held_out_episodes(episodes, 0.2, seed=4, name="r2r"))
    assert held_out_episodes(episodes, 0.01, 0).sum() == 7  # at least one episode
    assert held_out_episodes(np.zeros(5, dtype=int), 0.5, 0).sum() == 0  # never the only episode
    assert held_out_episodes(episodes, 0.0, 0).sum() == 0


def test_val_fraction_splits_by_episode_and_no_frame_leaks(tiny_cfg, tmp_path):
    tiny_cfg.data.val_fraction = 0.25
    seed_everything(tiny_cfg.seed)
    model, train_data = build_model_and_data(tiny_cfg, tmp_path)
    val = build_val_data(tiny_cfg, model)
    full = load_data(dataclasses.replace(tiny_cfg.data, val_fraction=0.0), model, tiny_cfg.seed,
                     open_indexes(tiny_cfg.data, model, default_index_root("")), ErrorPolicy("raise"))
    assert len(train_data.samples) + len(val.samples) == len(full.samples)  # every sample on exactly one side
    assert len(_episodes_of(val)) == 6 and len(_episodes_of(train_data)) == 18  # 25 % of 24 episodes
    assert not _episodes_of(val) & _episodes_of(train_data)
    store = train_data.samples.store
    train_frames, _ = store.frames_of(train_data.samples.rows)
    val_frames, _ = store.frames_of(val.samples.rows)
    assert not set(train_frames.tolist()) & set(val_frames.tolist())  # no held-out frame is trained on


def _composed_logits(model, batch):
    """Full-vocabulary logits of the composed model's causal LM, called directly (not through
    forward_lm or the output-embedding hook the validation uses)."""
    features = model.encode_images(model.prepare_frames(batch.pixels))
    embeds = model.embed(batch.input_ids, features, batch.slot_frames, batch.slot_age)
    positions = model.position_ids(batch.input_ids, batch.attention_mask)
    return model.lm(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=positions).logits


@torch.no_grad()
def test_val_metrics_equal_independent_computation(tiny_cfg, tmp_path):
    tiny_cfg.data.val_fraction = 0.25
    seed_everything(tiny_cfg.seed)
    model, _ = build_model_and_data(tiny_cfg, tmp_path)
    model.eval()
    val = build_val_data(tiny_cfg, model)
    vset = validation_set(val, batch_size=7)
    metrics = validate_samples(vset, model, lambda fn, *a: fn(model, *a), torch.device("cpu"))
    # Independent: forward_lm's own mean loss over all held-out samples in one batch ...
    everything = collate(list(val.samples), val.frames, val.pad_id, val.image_id)
    assert metrics["val/loss"] == pytest.approx(float(batch_loss(model, everything, torch.device("cpu"))), rel=1e-5)
    # ... and the LM's full logits: a sample is right when every answer token is the argmax.
    logits = _composed_logits(model, everything)
    targets = everything.labels[:, 1:]
    right = ((logits[:, :-1].argmax(-1) == targets) | (targets == IGNORE_INDEX)).all(1)
    assert metrics["val/accuracy"] == pytest.approx(float(right.double().mean()), abs=1e-6)
    assert metrics["val/samples"] == len(val.samples) == vset.samples
    # Two ranks' shards (batches r, r + 2, ...) sum to the same numbers (reduction mocked per rank).
    parts = [validate_samples(vset, model, lambda fn, *a: fn(model, *a), torch.device("cpu"), rank=r, world_size=2)
             for r in (0, 1)]
    assert parts[0]["val/samples"] + parts[1]["val/samples"] == metrics["val/samples"]


def test_per_source_metrics_with_val_sources(tiny_cfg, tmp_path, gridnav_root):
    other = tmp_path / "other"
    write_dataset(other, episodes=6, seed=7, split="train")
    tiny_cfg.data.val_sources = [SourceConfig(name="a", format="lerobot_vln", path=str(gridnav_root), percent=10),
                                 SourceConfig(name="b", format="lerobot_vln", path=str(other))]
    tiny_cfg.eval.every = 10
    seed_everything(tiny_cfg.seed)
    model, _ = build_model_and_data(tiny_cfg, tmp_path / "probe")
    val = build_val_data(tiny_cfg, model)
    counts = {n: int((val.sample_source == i).sum()) for i, n in enumerate(val.source_names)}
    assert counts["a"] == 72 and counts["b"] > 100  # 10 % of a's 717 samples, rounded (the percent applies), all of b
    summary = train(tiny_cfg)
    line = _metrics(Path(tiny_cfg.output_dir))[10]
    assert {"val/a/loss", "val/a/accuracy", "val/b/loss", "val/b/accuracy"} <= set(line)
    assert line["val/samples"] == counts["a"] + counts["b"]
    a, b = line["val/a/loss"], line["val/b/loss"]
    assert min(a, b) <= line["val/loss"] <= max(a, b)
    assert summary["steps"] == 20


def test_best_checkpoint_is_the_best_step_survives_rotation_and_eval_uses_it(tiny_cfg):
    tiny_cfg.data.val_fraction, tiny_cfg.eval.every = 0.25, 2
    tiny_cfg.eval.rollout_episodes = 4
    tiny_cfg.train.best_metric = "val/accuracy"
    tiny_cfg.train.ckpt_every, tiny_cfg.train.keep_checkpoints = 2, 20
    summary = train(tiny_cfg)
    out = Path(tiny_cfg.output_dir)
    lines = _metrics(out)
    validated = {s: m["val/accuracy"] for s, m in lines.items() if "val/accuracy" in m}
    assert sorted(validated) == list(range(2, 21, 2))
    assert all(lines[s]["eval/episodes"] == 4 and 0 <= lines[s]["eval/sr"] <= 1 for s in validated)
    best_step = max(validated, key=lambda s: (validated[s], -s))  # the first step with the highest accuracy
    info = json.loads((out / "checkpoints" / "best" / "best.json").read_text())
    assert (info["step"], info["value"]) == (best_step, validated[best_step])
    assert summary["best"]["step"] == best_step and summary["best"]["mode"] == "max"
    # Its weights are the weights of that step (the run checkpoint of the same step holds them too).
    best = load_file(out / "checkpoints" / "best" / "model.safetensors")
    at_step = load_file(out / "checkpoints" / f"step-{best_step:07d}" / "trained.safetensors")
    assert at_step and all(torch.equal(best[k], v) for k, v in at_step.items())
    report = evaluate_run(out, episodes=4)
    assert report["model"].startswith(f"best (val/accuracy") and f"step {best_step})" in report["model"]
    assert evaluate_run(out, episodes=4, which="final")["model"] == "final"


def test_best_is_never_rotated_and_resume_continues_the_bookkeeping(tiny_cfg, tmp_path):
    tiny_cfg.data.val_fraction, tiny_cfg.eval.every = 0.25, 5
    tiny_cfg.train.best_metric = "val/loss"
    tiny_cfg.train.ckpt_every, tiny_cfg.train.keep_checkpoints = 5, 1
    full = train(tiny_cfg)
    out = Path(tiny_cfg.output_dir)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step-0000020"]
    # Resume from step 10 of a copy: the tracker continues from the checkpoint and ends the same.
    ref = tmp_path / "ref"
    tiny_cfg.train.keep_checkpoints = 10
    train(dataclasses.replace(tiny_cfg, output_dir=str(ref)))
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed, ignore=shutil.ignore_patterns("step-0000015", "step-0000020", "model", "summary.json"))
    (resumed / "checkpoints" / "step-0000010").exists() or pytest.fail("copy lost step 10")
    again = train(dataclasses.replace(tiny_cfg, output_dir=str(resumed), train=dataclasses.replace(tiny_cfg.train, resume=True)))
    assert {k: again["best"][k] for k in ("metric", "step", "stale")} == {k: full["best"][k] for k in ("metric", "step", "stale")}
    assert again["best"]["value"] == pytest.approx(full["best"]["value"], rel=1e-5)


def test_early_stop_after_patience_validations_without_improvement(tiny_cfg):
    tiny_cfg.data.val_fraction, tiny_cfg.eval.every = 0.25, 2
    # val/loss falls during this run, so "higher is better" never improves after the first validation.
    tiny_cfg.train.best_metric, tiny_cfg.train.best_mode, tiny_cfg.train.early_stop_patience = "val/loss", "max", 2
    summary = train(tiny_cfg)
    out = Path(tiny_cfg.output_dir)
    assert summary["early_stopped_at_step"] == 6 and summary["steps"] == 6
    assert summary["best"]["step"] == 2 and summary["best"]["stale"] == 2
    assert (out / "checkpoints" / "step-0000006").exists() and (out / "model" / "model.safetensors").exists()
    assert max(_metrics(out)) == 6


def test_recover_best_after_a_crash_between_the_renames(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".old-best").mkdir(parents=True)
    (ckpts / ".old-best" / "best.json").write_text("{}")
    assert recover_best(ckpts) == ckpts / "best" and (ckpts / "best" / "best.json").exists()
    assert not (ckpts / ".old-best").exists()
    assert recover_best(tmp_path / "none") is None


def test_best_mode_auto():
    assert better_is_lower("val/loss") and better_is_lower("val/r2r/loss") and better_is_lower("eval/ne")
    assert not better_is_lower("eval/sr") and not better_is_lower("val/accuracy") and not better_is_lower("eval/ndtw")
    assert better_is_lower("eval/sr", "min") and not better_is_lower("val/loss", "max")


@pytest.mark.parametrize("overrides, message", [
    (["train.best_metric=val/loss"], "needs validation during training: set eval.every"),
    (["eval.every=5"], "nothing to validate on"),
    (["eval.every=5", "eval.rollout_episodes=4", "train.best_metric=val/loss"], "needs held-out samples"),
    (["eval.every=5", "data.val_fraction=0.1", "train.best_metric=eval/sr"], "needs closed-loop episodes"),
    (["data.val_fraction=1.0"], "must be in [0, 1)"),
    (["eval.every=5", "data.val_fraction=0.1", "train.early_stop_patience=3"], "needs train.best_metric"),
    (["eval.every=5", "eval.rollout_episodes=4", "parallel.backend=fsdp2"], "whole weights on every rank"),
])
def test_validation_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config(gridnav_tiny(), overrides=overrides)


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlmtrain.cli", "train", "--preset", "gridnav_tiny",
                           f"output_dir={tmp_path}", "train.best_metric=eval/sr"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.best_metric='eval/sr'" in proc.stderr
