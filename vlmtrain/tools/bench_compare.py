"""``vlmtrain bench --compare hf-trainer``: vlmtrain's training against the stock ``transformers.Trainer``
recipe (``tools/hf_trainer_recipe.py``) on the same model, data and hyper-parameters, whole process.

Each of ``pairs`` pairs runs, one after the other in fresh processes, the stock recipe and then
``vlmtrain train`` for ``epochs`` epochs, both with seed ``seed + k`` in pair k (so the pairs also
show the seed-to-seed noise); each is timed from process start to exit (imports, data
loading, image decoding, feature caching, training and saving the final model all count), into a
fresh directory (so vlmtrain's feature cache starts cold every time). Samples/s = samples trained /
whole-process seconds; the ratio of each pair and the median over pairs are reported.

Learning is compared too: each final model's mean next-token loss on held-out samples (``heldout``,
a LLaVA-style JSON: the workload's ``data/heldout.json``), computed for both by the same code (the
stock dataset and collator, the HF model's own forward, labels on the answers), and the last logged
training loss of each run. The spread over pairs is the run-to-run noise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from vlmtrain.config import RunConfig, save_config
from vlmtrain.tools.hf_trainer_recipe import StockVLNDataset, check_supported, collate

log = logging.getLogger("vlmtrain")


def _run(cmd: list[str], log_path: Path) -> float:
    """Run ``cmd`` to completion, output to ``log_path``; whole-process seconds. A failure is an error
    that names the log."""
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {rc} (log {log_path}): {tail[0]}")
    return seconds


@torch.no_grad()
def heldout_loss(model_dir: str | Path, annotation: str | Path, frame_size: int, processor_dir: str | Path,
                 batch_size: int = 8) -> float:
    """Mean next-token loss over every labelled token of ``annotation``'s samples, of the HF model
    saved in ``model_dir``, through the stock recipe's dataset and collator (tokenizer and image
    processor from ``processor_dir``) and the model's own forward."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    data = StockVLNDataset(annotation, processor_dir, frame_size)
    fn = collate(int(data.tokenizer.pad_token_id))
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = fn([data[i] for i in range(start, min(start + batch_size, len(data)))])
        n = int((batch["labels"][:, 1:] != -100).sum())
        image = batch["input_ids"] == model.config.image_token_id
        loss = model(**batch, mm_token_type_ids=image.int(), use_cache=False).loss
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def _last_loss(history: list) -> Optional[float]:
    return float(history[-1][1]) if history else None


def _vlmtrain_losses(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss/train"]) for r in rows if "loss/train" in r]


def compare_hf_trainer(cfg: RunConfig, pairs: int = 3, epochs: float = 1.0, heldout: Optional[str] = None) -> dict:
    """Run the comparison described in the module docstring under ``cfg.output_dir/compare``; returns
    the record (also written to ``compare/compare.json``)."""
    check_supported(cfg)
    if pairs < 1 or epochs <= 0:
        raise ValueError(f"pairs={pairs} must be >= 1 and epochs={epochs} > 0")
    root = Path(cfg.output_dir) / "compare"
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs)), config)
    frame = cfg.model.frame_size or 448
    runs = []
    for k in range(pairs):
        row = {"seed": cfg.seed + k}
        for name in ("hf_trainer", "vlmtrain"):
            out = root / f"{name}_{k}"
            seed = f"seed={cfg.seed + k}"
            if name == "hf_trainer":
                cmd = [sys.executable, "-m", "vlmtrain.tools.hf_trainer_recipe", str(config), seed, "--out", str(out),
                       "--epochs", str(epochs)]
            else:
                cmd = [sys.executable, "-m", "vlmtrain.cli", "train", "--config", str(config), seed, f"output_dir={out}",
                       f"features.cache_dir={out / 'feature_cache'}", "train.progress=false"]
            out.mkdir(parents=True, exist_ok=True)
            seconds = _run(cmd, out.parent / f"{name}_{k}.log")
            summary = json.loads((out / "summary.json").read_text())
            history = summary.get("loss_history") if name == "hf_trainer" else _vlmtrain_losses(out)
            result = {"seconds": round(seconds, 2), "samples": int(summary["samples"]),
                      "samples_per_s": round(summary["samples"] / seconds, 3), "last_train_loss": _last_loss(history)}
            if heldout:
                result["heldout_loss"] = round(heldout_loss(out / "model", heldout, frame, cfg.model.path), 4)
            row[name] = result
            log.info("pair %d %s: %s", k, name, json.dumps(result))
        row["speedup"] = round(row["vlmtrain"]["samples_per_s"] / row["hf_trainer"]["samples_per_s"], 3)
        runs.append(row)
    record = {"compare": "hf-trainer", "epochs": epochs, "pairs": runs,
              "median_speedup": round(statistics.median(r["speedup"] for r in runs), 3),
              "median_samples_per_s": {n: round(statistics.median(r[n]["samples_per_s"] for r in runs), 3)
                                       for n in ("hf_trainer", "vlmtrain")}}
    if heldout:
        record["heldout_loss"] = {n: [r[n]["heldout_loss"] for r in runs] for n in ("hf_trainer", "vlmtrain")}
    (root / "compare.json").write_text(json.dumps(record, indent=1))
    return record


def format_compare(record: dict) -> str:
    """The comparison as a small text table (what the CLI prints before the JSON)."""
    lines = [f"{'pair':>4}  {'hf-trainer s/s':>14}  {'vlmtrain s/s':>12}  {'ratio':>6}  {'held-out loss (hf / vlmtrain)':>30}"]
    for k, r in enumerate(record["pairs"]):
        held = ""
        if "heldout_loss" in r["hf_trainer"]:
            held = f"{r['hf_trainer']['heldout_loss']:.4f} / {r['vlmtrain']['heldout_loss']:.4f}"
        lines.append(f"{k:>4}  {r['hf_trainer']['samples_per_s']:>14.2f}  {r['vlmtrain']['samples_per_s']:>12.2f}  "
                     f"{r['speedup']:>5.2f}x  {held:>30}")
    lines.append(f"median speed-up {record['median_speedup']:.2f}x (whole process, {record['epochs']:g} epoch(s))")
    return "\n".join(lines)
