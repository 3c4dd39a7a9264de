"""Closed-loop GridNav evaluation of a trained run, next to two trivial policies: one evaluator for
every model family, over the model protocol.

The run's ``model/`` (what ``VLM.save_final`` wrote) is loaded (``models.registry.load_final``) and
driven by :class:`VLMPolicy`, a batched policy over the simulator's episode states.

**Decoding: candidate scoring.** A model answers in its own chat format with an action *text*
(``STOP``, ``↑``, ``←``, ``→``), which its tokenizer may split into several tokens (the arrows are
multi-byte in byte-level BPEs), followed by its end-of-answer token. Instead of sampling or greedy
generation (which can produce text that is no action and needs a parser), every state is scored
against all four complete answers and the policy takes the most likely one:

    score(a) = log P(action_text(a) + end-of-answer | prompt, frames)

summed over exactly the positions training labels (``encode_conversation``'s labels), so the score
is the log-probability of the whole training target. Including the end token makes the four answers
comparable whatever their token counts (a candidate cannot win by being a prefix of another), and
the sum (not the mean) is the answer's probability, not a length-normalised proxy. Ties go to the
lowest action id (STOP first), as ``argmax`` breaks them.

The log-probabilities come from the model's own ``forward_lm`` (so Qwen MRoPE position ids, Qwen3-VL
deepstack and the composed model's history pooling run exactly as in training): a forward hook on the
output embedding (``output_embeddings()``) captures the logits that ``forward_lm`` computes at the
labelled positions only, and :func:`answer_log_likelihood` turns them into per-sample sums. The loss
``forward_lm`` returns is checked against the captured logits, so a model that stopped computing
logits that way fails loudly instead of scoring garbage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from vlmtrain.config import RunConfig, load_config
from vlmtrain.data.frames import resize_array
from vlmtrain.data.samples import ACTION_TEXTS, decision_turns, history_indices
from vlmtrain.envs.gridnav import simulate
from vlmtrain.envs.gridnav.metrics import METRIC_KEYS, summarize
from vlmtrain.envs.gridnav.simulate import EpisodeState
from vlmtrain.envs.gridnav.expert import make_episode
from vlmtrain.models.protocol import VLM, Encoded
from vlmtrain.models.registry import load_final
from vlmtrain.train.evaluate_n1 import PixelGoalPolicy, is_n1_run
from vlmtrain.train.scoring import answer_log_likelihood, pad_encoded

log = logging.getLogger("vlmtrain")
# States scored per LM forward; each state is len(ACTION_TEXTS) = 4 rows (one per candidate answer).
DEFAULT_STATES_PER_FORWARD = 32
# Frame features kept across steps (each frame of a live episode is encoded once) up to this many bytes;
# past it, frames are encoded again when a later step shows them.
FEATURE_BUDGET_BYTES = 2 << 30


class VLMPolicy:
    """A trained model of any family as a batched GridNav policy that picks actions by candidate scoring.

    Each call scores the live states in chunks of ``batch_size`` states (x 4 candidate answers per LM
    forward). Each frame an episode observes is resized to the model's frame size exactly as training
    decodes frames (bilinear, ``data/frames.py``), goes through ``prepare_frames`` and is encoded once;
    its features are kept while the episode runs (up to ``FEATURE_BUDGET_BYTES``) and shared by all
    four candidates of every later state that shows it.
    """

    def __init__(self, model: VLM, num_history: int, prompt: str, device: torch.device,
                 batch_size: int = DEFAULT_STATES_PER_FORWARD):
        height, width = model.frame_size
        if height != width:  # training decodes frames square (data/dataset.py) and so does resize_array
            raise ValueError(f"{model.family}: frame size {model.frame_size} is not square")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.model, self.num_history, self.prompt = model, num_history, prompt
        self.device, self.batch_size, self.size = device, batch_size, height
        self.pad_id = int(model.tokenizer.pad_token_id)  # never the image token (the model checks it)
        self._encoded: dict[tuple[str, int], list[Encoded]] = {}
        self._features: dict[int, dict[int, torch.Tensor]] = {}  # episode -> frame index -> (K, D)
        self._feature_bytes = 0

    def candidates(self, instruction: str, num_history_frames: int) -> list[Encoded]:
        """The tokenised conversation of every action answer (cached per instruction and history length)."""
        key = (instruction, num_history_frames)
        if key not in self._encoded:
            encoded = [self.model.encode_conversation(list(decision_turns(instruction, num_history_frames, a, self.prompt)))
                       for a in range(len(ACTION_TEXTS))]
            for e in encoded:
                if e.num_images != num_history_frames + 1:
                    raise ValueError(f"data.prompt={self.prompt!r} gives {e.num_images} image slots for "
                                     f"{num_history_frames + 1} frames")
            self._encoded[key] = encoded
        return self._encoded[key]

    @torch.no_grad()
    def scores(self, states: Sequence[EpisodeState]) -> torch.Tensor:
        """(S, 4) log-probability of each action answer for each state (column = action id), on CPU."""
        live = {s.spec.index for s in states}
        for episode in [e for e in self._features if e not in live]:  # episodes that ended
            self._feature_bytes -= sum(f.nbytes for f in self._features.pop(episode).values())
        out = [self._score_chunk(states[i: i + self.batch_size]) for i in range(0, len(states), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, len(ACTION_TEXTS))

    def __call__(self, states: list[EpisodeState]) -> list[int]:
        """One action per live episode state: the highest-scoring candidate answer."""
        return self.scores(states).argmax(-1).tolist()

    def _frame_features(self, states: Sequence[EpisodeState], shown: list[list[int]]) -> dict[tuple[int, int], torch.Tensor]:
        """Features of every frame the chunk shows: kept ones, the rest encoded now (each once)."""
        feats: dict[tuple[int, int], Optional[torch.Tensor]] = {}
        todo: list[tuple[int, int]] = []
        frames: list[np.ndarray] = []
        for s, indices in zip(states, shown):
            for i in indices:
                key = (s.spec.index, i)
                if key in feats:
                    continue
                feats[key] = self._features.get(s.spec.index, {}).get(i)
                if feats[key] is None:
                    todo.append(key)
                    frames.append(resize_array(s.frames[i], self.size))
        if todo:
            pixels_NCHW = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
            fresh = self.model.encode_images(self.model.prepare_frames(pixels_NCHW).to(self.device))
            for key, f in zip(todo, fresh):
                feats[key] = f
                if self._feature_bytes + f.nbytes <= FEATURE_BUDGET_BYTES:
                    self._features.setdefault(key[0], {})[key[1]] = f
                    self._feature_bytes += f.nbytes
        return feats

    def _score_chunk(self, states: Sequence[EpisodeState]) -> torch.Tensor:
        shown = [history_indices(len(s.frames) - 1, self.num_history) + [len(s.frames) - 1] for s in states]
        feats = self._frame_features(states, shown)
        order = list(feats)  # the chunk's unique frames, in first-use order
        row_of = {key: r for r, key in enumerate(order)}
        encoded: list[Encoded] = []
        slots: list[int] = []
        ages: list[int] = []
        for s, indices in zip(states, shown):
            state_slots = [row_of[(s.spec.index, i)] for i in indices]
            for e in self.candidates(s.spec.instruction, len(indices) - 1):
                encoded.append(e)
                slots.extend(state_slots)
                ages.extend(range(len(indices) - 1, -1, -1))
        ids, labels, mask = pad_encoded(encoded, self.pad_id, self.device)
        features = torch.stack([feats[key] for key in order])
        embeds = self.model.embed(ids, features, torch.tensor(slots, dtype=torch.long, device=self.device),
                                  torch.tensor(ages, dtype=torch.long, device=self.device))
        positions = self.model.position_ids(ids, mask)
        ll = answer_log_likelihood(self.model, embeds, labels, mask, positions)
        return ll.view(len(states), len(ACTION_TEXTS)).cpu()


def run_model_dir(run_dir: Path, which: str = "auto") -> tuple[Path, str]:
    """(directory, label) of the model ``vlmtrain eval`` evaluates: ``best`` is
    ``checkpoints/best`` (what ``train.best_metric`` kept), ``final`` is ``model/``, ``auto`` the best
    one when the run kept it, else the final one. The label names the step and metric of a best model."""
    best = run_dir / "checkpoints" / "best"
    if which == "best" or (which == "auto" and (best / "best.json").exists()):
        if not (best / "best.json").exists():
            raise FileNotFoundError(f"{best}: the run kept no best model (set train.best_metric and eval.every)")
        info = json.loads((best / "best.json").read_text())
        return best, f"best ({info['metric']} {info['value']:.4g} at step {info['step']})"
    if which not in ("auto", "final"):
        raise ValueError(f"which={which!r}: expected auto, best or final")
    return run_dir / "model", "final"


def load_run_model(model_dir: Path, run_dir: Path, cfg: RunConfig) -> VLM:
    """The run's model saved in ``model_dir`` (``model/`` or ``checkpoints/best``) in eval mode; frames
    sized as in training."""
    try:
        return load_final(model_dir, cfg.model)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{model_dir}: no final model to evaluate (was training interrupted?). Finish training "
            f"(vlmtrain train with train.resume=true), or export the newest checkpoint there: "
            f"vlmtrain export {run_dir} --merged {model_dir}") from None


def run_policy(run_dir: Path, cfg: RunConfig, device: torch.device,
               batch_size: int = DEFAULT_STATES_PER_FORWARD, which: str = "auto"
               ) -> tuple[VLMPolicy | PixelGoalPolicy, str]:
    """(the run's trained model on ``device`` as a GridNav policy, history and prompt from its config;
    which model it is: :func:`run_model_dir`'s label). A run on InternVLA-N1 reference samples answers
    with pixel goals, turns and STOP: its policy is ``evaluate_n1.PixelGoalPolicy``."""
    model_dir, label = run_model_dir(run_dir, which)
    model = load_run_model(model_dir, run_dir, cfg).to(device)
    if is_n1_run(cfg):
        log.info("eval: %s model %s from %s, frames %s, InternVLA-N1 System 2 (pixel goals, turns, STOP) with "
                 "GridNav's geometric System 1", model.family, label, model_dir, model.frame_size)
        return PixelGoalPolicy(model, cfg, device), label
    log.info("eval: %s model %s from %s, frames %s, candidate scoring of %d actions, %d states per forward",
             model.family, label, model_dir, model.frame_size, len(ACTION_TEXTS), batch_size)
    return VLMPolicy(model, cfg.data.num_history, cfg.data.prompt, device, batch_size), label


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


def evaluate_run(run_dir: str | Path, episodes: Optional[int] = None, seed: Optional[int] = None,
                 which: str = "auto") -> dict:
    """Roll the run's policy out on held-out GridNav episodes; write and return ``eval.json``.
    ``which``: the model (:func:`run_model_dir`: auto = the best one the run kept, else the final one)."""
    run_dir = Path(run_dir)
    cfg = load_config(yaml_path=run_dir / "config.yaml")
    n = episodes if episodes is not None else cfg.eval.episodes
    seed = seed if seed is not None else cfg.eval.seed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, label = run_policy(run_dir, cfg, device, which=which)
    specs = [make_episode(seed, "test", i) for i in range(n)]
    report = rollout_report(specs, policy, cfg.eval.max_steps, seed)
    report["model"] = label
    if isinstance(policy, PixelGoalPolicy):
        report["decisions"] = policy.report()
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
    if "decisions" in report:
        lines.append("decisions: " + ", ".join(f"{k} {v}" for k, v in report["decisions"].items()))
    if "model" in report:
        lines.append(f"model: {report['model']}")
    return "\n".join(lines)
