"""Validation during training (``eval.every``): loss and answer accuracy on held-out samples per
source, GridNav closed-loop SR/SPL on held-out episodes, and the best-checkpoint bookkeeping.

**Held-out samples** come from ``data.val_fraction`` (whole episodes of each training source,
``mixture.held_out_episodes``) or ``data.val_sources``. They are collated once, in fixed padded
batches of ``eval.val_batch_size`` samples, and every validation runs the same batches in eval mode
without gradients, through the run's parallel wrapper (so FSDP2 / ZeRO-3 gather their shards as in
a training forward). Rank r takes batches r, r + world, ...; a rank with fewer batches repeats its
first one and drops the result, so every rank runs the same number of forwards.

- ``val/loss``: mean negative log-likelihood per label token, as the training loss is normalised;
- ``val/accuracy``: the share of samples whose *whole* answer is the argmax at every answer token
  (teacher forced): for a VLN decision, the next action exactly right;
- both also per source (``val/<source>/loss``, ``val/<source>/accuracy``), and ``val/samples``.

**Closed loop** (``eval.rollout_episodes``): GridNav episodes of split "val" (never the "test"
episodes ``vlmtrain eval`` reports, nor the training ones), driven by :class:`VLMPolicy` on the live
model; each rank rolls out every world-th episode and the sums are reduced, so ``eval/sr``,
``eval/spl``, ``eval/ne``, ``eval/os``, ``eval/ndtw`` are means over all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from vlmtrain.config import RunConfig
from vlmtrain.data.dataset import TrainData
from vlmtrain.data.loader import Batch, collate
from vlmtrain.envs.gridnav import simulate
from vlmtrain.envs.gridnav.expert import make_episode
from vlmtrain.envs.gridnav.metrics import METRIC_KEYS, metric_sums
from vlmtrain.features.source import FeatureSource
from vlmtrain.models.protocol import VLM
from vlmtrain.parallel.init import all_reduce_values
from vlmtrain.train.evaluate import VLMPolicy
from vlmtrain.train.evaluate_n1 import PixelGoalPolicy, is_n1_run
from vlmtrain.train.scoring import captured_logits, labelled_log_probs
from vlmtrain.train.step import lm_loss, prepare_batch

log = logging.getLogger("vlmtrain")
ROLLOUT_SPLIT = "val"


@dataclass
class ValidationSet:
    """The held-out samples as fixed batches, and the source (index into ``names``) of every row."""

    batches: list[Batch]
    row_sources: list[np.ndarray]
    names: list[str]

    @property
    def samples(self) -> int:
        """Held-out samples validated each time."""
        return int(sum(len(r) for r in self.row_sources))


def validation_set(data: TrainData, batch_size: int, max_samples: int = 0, seed: int = 0) -> ValidationSet:
    """``data``'s samples (all, or a seeded subset of ``max_samples``, the same at every validation)
    in padded batches of ``batch_size`` rows, in sample order."""
    order = np.arange(len(data.samples))
    if 0 < max_samples < len(order):
        order = np.sort(np.random.default_rng(seed).choice(order, size=max_samples, replace=False))
    batches, sources = [], []
    for i in range(0, len(order), batch_size):
        chunk = order[i: i + batch_size]
        batches.append(collate([data.samples[int(j)] for j in chunk], data.frames, data.pad_id, data.image_id))
        sources.append(data.sample_source[chunk])
    return ValidationSet(batches, sources, list(data.source_names))


def _batch_stats(model: VLM, batch: Batch, device: torch.device, source: FeatureSource
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``batch``: (summed label NLL, label tokens, whole answer argmax-correct), on CPU.
    Runs inside the parallel wrapper's forward (``model`` is the module it wraps)."""
    prepare_batch(model, batch, source)
    features, _ = source.features(model, batch, device)
    with captured_logits(model) as captured:
        mean_loss = lm_loss(model, batch, features, device)
    logp_T, correct_T, rows_T = labelled_log_probs(model, captured, batch.labels, mean_loss)
    rows_T, n = rows_T.cpu(), batch.labels.shape[0]
    nll = torch.bincount(rows_T, weights=-logp_T.double().cpu(), minlength=n)
    tokens = torch.bincount(rows_T, minlength=n).double()
    wrong = torch.bincount(rows_T, weights=(~correct_T).double().cpu(), minlength=n)
    return nll, tokens, (wrong == 0) & (tokens > 0)


@torch.no_grad()
def validate_samples(vset: ValidationSet, model: VLM, forward: Callable, device: torch.device,
                     rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """``val/*`` metrics of ``model`` on ``vset`` (collective when ``world_size`` > 1: every rank
    gets the same numbers). ``forward(fn, *args)`` runs ``fn(model, *args)`` through the parallel
    wrapper; the caller puts the model in eval mode."""
    n_src = len(vset.names)
    sums = np.zeros((n_src, 4))  # per source: nll, tokens, correct samples, samples
    source = FeatureSource()  # held-out frames are encoded, never cached
    calls = -(-len(vset.batches) // world_size)
    for k in range(calls):
        j = rank + k * world_size
        real = j < len(vset.batches)
        batch = vset.batches[j if real else 0]
        nll, tokens, correct = forward(_batch_stats, batch, device, source)
        if not real:
            continue
        src = vset.row_sources[j]
        np.add.at(sums[:, 0], src, nll.numpy())
        np.add.at(sums[:, 1], src, tokens.numpy())
        np.add.at(sums[:, 2], src, correct.double().numpy())
        np.add.at(sums[:, 3], src, 1.0)
    sums = np.array(all_reduce_values(sums.reshape(-1).tolist(), "sum")).reshape(n_src, 4)
    total = sums.sum(0)
    out = {"val/loss": total[0] / max(total[1], 1.0), "val/accuracy": total[2] / max(total[3], 1.0),
           "val/samples": int(total[3])}
    for name, (nll, tokens, correct, samples) in zip(vset.names, sums):
        if samples and n_src > 1:
            out[f"val/{name}/loss"] = nll / max(tokens, 1.0)
            out[f"val/{name}/accuracy"] = correct / samples
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


@torch.no_grad()
def validate_rollouts(model: VLM, cfg: RunConfig, device: torch.device, rank: int = 0,
                      world_size: int = 1) -> dict[str, float]:
    """``eval/*`` closed-loop metrics of ``model`` on ``eval.rollout_episodes`` GridNav episodes of
    split "val" (collective when ``world_size`` > 1), driven as ``vlmtrain eval`` drives it (a run on
    InternVLA-N1 reference samples: ``evaluate_n1.PixelGoalPolicy``). ``model`` is the plain module
    (its weights whole on every rank: a single process or DDP)."""
    ev = cfg.eval
    specs = [make_episode(ev.seed, ROLLOUT_SPLIT, i) for i in range(rank, ev.rollout_episodes, world_size)]
    policy = (PixelGoalPolicy(model, cfg, device) if is_n1_run(cfg)
              else VLMPolicy(model, cfg.data.num_history, cfg.data.prompt, device))
    results = simulate.rollout(specs, policy, max_steps=ev.max_steps) if specs else []
    local = metric_sums(results)
    sums = all_reduce_values([float(len(results))] + [local[k] for k in METRIC_KEYS], "sum")
    n = max(sums[0], 1.0)
    return {**{f"eval/{k}": round(v / n, 6) for k, v in zip(METRIC_KEYS, sums[1:])}, "eval/episodes": int(sums[0])}


def better_is_lower(metric: str, mode: str = "auto") -> bool:
    """Whether a lower ``metric`` is better: ``mode`` min / max, or auto (lower for a loss or a
    navigation error, higher for everything else: accuracy, SR, SPL, OS, nDTW)."""
    if mode != "auto":
        return mode == "min"
    return metric.endswith("loss") or metric.endswith("/ne")


@dataclass
class BestTracker:
    """The best value of ``train.best_metric`` so far and how many validations since it improved
    (kept in the run checkpoint, so a resumed run continues the same bookkeeping)."""

    metric: str
    lower: bool
    value: Optional[float] = None
    step: int = 0
    stale: int = 0

    def update(self, step: int, metrics: dict[str, Any]) -> bool:
        """Record one validation; True when it is a new best (the caller saves ``checkpoints/best``)."""
        if self.metric not in metrics:
            raise KeyError(f"train.best_metric={self.metric!r} is not among the validation metrics "
                           f"{sorted(k for k in metrics if k.startswith(('val/', 'eval/')))}")
        value = float(metrics[self.metric])
        improved = self.value is None or (value < self.value if self.lower else value > self.value)
        if improved:
            self.value, self.step, self.stale = value, step, 0
        else:
            self.stale += 1
        return improved

    def state(self) -> dict[str, Any]:
        """What the run checkpoint and ``summary.json`` keep."""
        return {"metric": self.metric, "mode": "min" if self.lower else "max", "value": self.value,
                "step": self.step, "stale": self.stale}

    @classmethod
    def restore(cls, metric: str, lower: bool, state: Optional[dict]) -> "BestTracker":
        """A tracker for ``metric``, continuing ``state`` when a checkpoint kept one for the same metric."""
        tracker = cls(metric, lower)
        if state and state.get("metric") == metric:
            tracker.value, tracker.step, tracker.stale = state.get("value"), int(state["step"]), int(state["stale"])
        return tracker
