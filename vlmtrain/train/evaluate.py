"""Closed-loop GridNav evaluation of a trained run, next to two trivial policies.

The composed model's policy lives here; HF-family runs use ``evaluate_hf.HFPolicy``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vlmtrain.config import RunConfig, load_config
from vlmtrain.data.frames import resize_array
from vlmtrain.data.gridnav import simulate
from vlmtrain.data.gridnav.metrics import summarize
from vlmtrain.data.gridnav.world import make_episode
from vlmtrain.data.samples import SampleTokenizer, history_indices
from vlmtrain.data.tokenizer import load_tokenizer
from vlmtrain.models.composed import ComposedVLM
from vlmtrain.train.checkpoint import latest_checkpoint
from vlmtrain.train.evaluate_hf import hf_policy

log = logging.getLogger("vlmtrain")
METRIC_KEYS = ("sr", "spl", "ne", "os", "ndtw")


class VLMPolicy:
    """A trained VLM as a batched GridNav policy.

    Each observed frame is encoded once per episode (features are kept while the episode runs); each
    step runs one LM forward over all active episodes and picks the highest-scoring action token.
    """

    def __init__(self, model: ComposedVLM, stok: SampleTokenizer, image_size: int, num_history: int,
                 device: torch.device):
        self.model, self.stok, self.size, self.num_history, self.device = model, stok, image_size, num_history, device
        self._feats: dict[int, list[torch.Tensor]] = {}
        self.pad_id = stok.tok.pad_token_id
        self.action_ids = torch.tensor(stok.action_ids, device=device)

    @torch.no_grad()
    def __call__(self, states: list) -> list[int]:
        """One action per active episode state."""
        new = []
        for s in states:
            cache = self._feats.setdefault(s.spec.index, [])
            new.extend((s.spec.index, i) for i in range(len(cache), len(s.frames)))
        if new:
            by_index = {s.spec.index: s for s in states}
            pixels = np.stack([resize_array(by_index[e].frames[i], self.size) for e, i in new])
            feats = self.model.encode_images(torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device))
            for (e, _), f in zip(new, feats):
                self._feats[e].append(f)
        rows, slot_feats, ages = [], [], []
        for s in states:
            t = len(s.frames) - 1
            frames = history_indices(t, self.num_history) + [t]
            rows.append(self.stok.prompt_ids(s.spec.instruction, len(frames) - 1))
            slot_feats.extend(self._feats[s.spec.index][i] for i in frames)
            ages.extend(range(len(frames) - 1, -1, -1))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        features = torch.stack(slot_feats)
        slots = torch.arange(features.shape[0], device=self.device)
        embeds = self.model.embed(ids, features, slots, torch.tensor(ages, device=self.device))
        last = mask.sum(1) - 1
        logits = self.model.next_token_logits(embeds, mask, last)
        return logits[:, self.action_ids].argmax(-1).tolist()


def load_run(run_dir: Path) -> tuple[RunConfig, ComposedVLM, SampleTokenizer]:
    """Config, model (final weights, else the newest checkpoint) and sample tokenizer of a run."""
    cfg = load_config(yaml_path=run_dir / "config.yaml")
    weights = run_dir / "model"
    if not (weights / "model.safetensors").exists():
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir}: no model/ and no checkpoint to evaluate")
        weights = ckpt
    model = ComposedVLM.from_pretrained(weights)
    tok = load_tokenizer(run_dir / "tokenizer")
    size = cfg.data.image_size
    stok = SampleTokenizer(tok, model.tokens_per_image(size), cfg.data.max_length,
                           model.tokens_per_history_image(size), cfg.data.prompt)
    return cfg, model, stok


def rollout_report(specs: list, policy: simulate.Policy, max_steps: int, seed: int) -> dict:
    """The ``eval.json`` report of ``policy`` on ``specs``: metrics, outcome fractions (the failure
    types) and the random and forward baselines on the same episodes."""
    report = summarize(simulate.rollout(specs, policy, max_steps=max_steps))
    report["baselines"] = {
        "random": summarize(simulate.rollout(specs, simulate.random_policy(seed), max_steps=max_steps)),
        "forward": summarize(simulate.rollout(specs, simulate.forward_policy(), max_steps=max_steps)),
    }
    report["split"] = "test"
    report["seed"] = seed
    return report


def evaluate_run(run_dir: str | Path, episodes: Optional[int] = None, seed: Optional[int] = None) -> dict:
    """Roll the run's policy out on held-out GridNav episodes; write and return ``eval.json``.

    The run config's ``model.family`` picks the policy: the composed model scores the action tokens
    after the prompt (``VLMPolicy``); an HF family loads ``model/`` and scores the four answers
    (``evaluate_hf.HFPolicy``). Both give the same report (``rollout_report``)."""
    run_dir = Path(run_dir)
    cfg = load_config(yaml_path=run_dir / "config.yaml")
    n = episodes if episodes is not None else cfg.eval.episodes
    seed = seed if seed is not None else cfg.eval.seed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.model.family == "composed":
        cfg, model, stok = load_run(run_dir)
        model.to(device).eval()
        policy: simulate.Policy = VLMPolicy(model, stok, cfg.data.image_size, cfg.data.num_history, device)
    else:
        policy = hf_policy(run_dir, cfg, device)
    specs = [make_episode(seed, "test", i) for i in range(n)]
    report = rollout_report(specs, policy, cfg.eval.max_steps, seed)
    (run_dir / "eval.json").write_text(json.dumps(report, indent=1))
    return report


def format_report(report: dict) -> str:
    """A small text table: the policy and the two baselines."""
    rows = [("vlmtrain policy", report)] + [(f"baseline: {k}", v) for k, v in report["baselines"].items()]
    lines = [f"{'policy':<18}" + "".join(f"{k.upper():>8}" for k in METRIC_KEYS)]
    for name, r in rows:
        lines.append(f"{name:<18}" + "".join(f"{r[k]:>8.3f}" for k in METRIC_KEYS))
    outcomes = ", ".join(f"{k} {v:.2f}" for k, v in report.get("outcomes", {}).items())
    lines.append(f"episodes: {report['episodes']} held-out (split test); outcomes: {outcomes}")
    return "\n".join(lines)
