"""The benchmark workload of ``vlmtrain bench --compare hf-trainer``: the shape of our users' Qwen-VL
VLN fine-tuning, small enough for a CPU.

``write_vln_workload`` writes

- ``model/``: a random Qwen2.5-VL of :data:`~vlmtrain.models.tiny_qwen.BENCH_SIZE` (5.7 M parameters:
  text 256 x 4 layers, vocab 4096; vision 128 x 4, patch 14, merge 2), its BPE tokenizer trained on the
  workload's own text, and its PIL image processor;
- ``data/train.json``: LLaVA-style conversations, one per navigation decision of ``episodes`` GridNav
  episodes. Decision t shows the history frames ``unique(linspace(0, t-1, 8))`` and the current frame
  t (InternVLA-N1's layout: up to 9 images), asks for the next action and is answered with the
  expert's action (``data/heldout.json``: the same for held-out episodes); ``data/frames/`` holds one ``size`` x ``size`` PNG per decision, so each frame is
  referenced by several samples, as in real VLN data;
- ``config.yaml``: the vlmtrain run of this workload (LoRA r8 on the LLM, vision and merger frozen,
  batch 4, lr 1e-4 cosine, fp32, one epoch); ``full_finetune: true`` trains every parameter instead.

Everything is generated offline and deterministically from ``seed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image

from vlmtrain.data.samples import ACTION_TEXTS, history_indices
from vlmtrain.envs.gridnav.expert import demonstrate, make_episode
from vlmtrain.envs.gridnav.render import render
from vlmtrain.envs.gridnav.world import episode_rng
from vlmtrain.models.tiny_qwen import BENCH_SIZE, QwenVLSize, save_tiny_qwen_vl

SYSTEM = "You are a navigation agent. Follow the instruction using the camera frames."
QUESTION = ("These are your historical observations: {history}. This is your current observation: "
            "{current}. Your task: {instruction}. What is your next action?")


@dataclass
class Workload:
    """Paths of a written workload."""

    root: Path
    model: Path
    annotations: Path
    config: Path
    samples: int
    frames: int


def user_text(instruction: str, history: int) -> str:
    """The human turn of one decision: one ``<image>`` per history frame, one for the current frame."""
    return QUESTION.format(history=" ".join(["<image>"] * history) or "none", current="<image>",
                           instruction=instruction)


# GridNav demonstrations with 10 % noisy actions and no detours: 60 episodes give 1574 decisions
# (26 per episode), the size of the issue-11 workload.
NOISE = 0.1


def _records(root: Path, split: str, episodes: int, seed: int, size: int) -> tuple[list[dict], int]:
    frames_dir = root / "data" / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    records, frames = [], 0
    for e in range(episodes):
        spec = make_episode(seed, split, e)
        demo = demonstrate(spec, episode_rng(seed, split, e, stream=1), noise_p=NOISE, detour_p=0.0)
        paths = []
        for t, pose in enumerate(demo.poses):
            rel = f"frames/{split}_e{e:04d}_t{t:03d}.png"
            Image.fromarray(render(spec.layout, pose, size)).save(root / "data" / rel, optimize=False)
            paths.append(rel)
        frames += len(paths)
        for t, label in enumerate(demo.labels):
            history = history_indices(t, 8)
            records.append({
                "id": f"{split}_e{e:04d}_t{t:03d}",
                "images": [paths[h] for h in history] + [paths[t]],
                "conversations": [
                    {"from": "system", "value": SYSTEM},
                    {"from": "human", "value": user_text(spec.instruction, len(history))},
                    {"from": "gpt", "value": ACTION_TEXTS[int(label)]},
                ],
            })
    return records, frames


def workload_config(root: Path, full_finetune: bool = False, frame_size: int = 112) -> dict:
    """The vlmtrain config of the workload at ``root`` (only what differs from vlmtrain's defaults, so
    every default, the fast path included, is what a user gets)."""
    cfg = {
        "output_dir": str(root / "runs" / ("full" if full_finetune else "lora")),
        "seed": 0,
        "data": {"format": "llava_json", "root": str(root / "data" / "train.json"), "max_length": 512},
        "model": {"family": "qwen2_5_vl", "path": str(root / "model"), "frame_size": frame_size},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.0, "beta2": 0.999, "min_lr_ratio": 0.0},
        "train": {"batch_size": 4, "epochs": 1.0, "log_every": 20, "ckpt_every": 0, "progress": False},
    }
    if not full_finetune:
        cfg["model"].update({"lora": True, "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.05,
                             "lora_parts": ["llm"]})
        cfg["train"].update({"freeze_vision": True, "freeze_projector": True})
    return cfg


def write_vln_workload(root: str | Path, episodes: int = 60, seed: int = 0, size: int = 112,
                       heldout_episodes: int = 8, model_size: QwenVLSize = BENCH_SIZE) -> Workload:
    """Write the workload (model, data, configs) under ``root``; see the module docstring. The
    ``heldout_episodes`` (split ``test``) go to ``data/heldout.json``: the comparison's held-out loss.
    ``size``: frame side in pixels (a multiple of the model's patch x merge); ``model_size``: the
    Qwen2.5-VL's sizes (tests use the small ``TEST_SIZE``)."""
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    records, frames = _records(root, "train", episodes, seed, size)
    annotations = root / "data" / "train.json"
    annotations.write_text(json.dumps(records))
    heldout, _ = _records(root, "test", heldout_episodes, seed, size)
    (root / "data" / "heldout.json").write_text(json.dumps(heldout))
    corpus = [SYSTEM, QUESTION, *ACTION_TEXTS, *{r["conversations"][1]["value"] for r in records}]
    model = save_tiny_qwen_vl(root / "model", family="qwen2_5_vl", seed=seed, size=model_size, corpus=corpus)
    for name, full in (("lora", False), ("full", True)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(workload_config(root, full, size), sort_keys=False))
    return Workload(root, model, annotations, root / "lora.yaml", len(records), frames)

