"""``vlmtrain bench --protocol internvl``: a throughput result that can be compared with a vendor's.

The protocol fixes how the figure is measured, prints the hyper-parameters it depends on, and appends
the result as one JSON line to a results file the user keeps:

- **TGS** (tokens per GPU per second, InternVL's figure) of every measured step: the step's tokens
  (text and visual, unpadded) over its wall time over the number of GPUs. Reported as mean, standard
  deviation, min and max over at least ``MIN_STEPS`` (15) measured steps, after ``warmup``
  unmeasured ones.
- **Loss target** (optional): after ``loss_steps`` optimizer steps, the mean training loss of the
  last ``LOSS_WINDOW`` steps (up to and including step ``loss_steps``) must be at most the target. A
  single step's loss is too noisy to gate on. A missed target makes the command exit 1.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vlmtrain.config import ConfigError, RunConfig
from vlmtrain.tools.bench import machine, prepare, run_steps

MIN_STEPS = 15
LOSS_WINDOW = 5


@dataclass(frozen=True)
class Protocol:
    """How a protocol measures: unmeasured warm-up steps and the default number of measured steps."""

    name: str
    warmup: int
    steps: int


PROTOCOLS: dict[str, Protocol] = {"internvl": Protocol("internvl", warmup=5, steps=20)}


def hyper_parameters(cfg: RunConfig, world_size: int = 1) -> dict:
    """The settings a TGS or loss figure depends on: two results are comparable only when these match."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    return {
        "model.family": cfg.model.family, "model.path": cfg.model.path or "(composed)",
        "train.precision": t.precision, "gpus": world_size,
        "per_device_micro_batch": t.batch_size // (world_size * t.grad_accum),
        "train.grad_accum": t.grad_accum, "global_batch": t.batch_size,
        "optim.lr": o.lr, "optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay,
        "optim.grad_clip": o.grad_clip, "data.num_history": d.num_history, "data.image_size": d.image_size,
        "data.packing": d.packing, "data.max_pack_tokens": d.max_pack_tokens,
        "model.lora": f"r {cfg.model.lora_rank}, alpha {cfg.model.lora_alpha}" if cfg.model.lora else "off",
        "features.cache": cfg.features.cache, "seed": cfg.seed,
    }


def _spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2), "std": round(statistics.stdev(values), 2),
            "min": round(min(values), 2), "max": round(max(values), 2)}


def check_arguments(protocol: str, steps: Optional[int], loss_target: Optional[float],
                    loss_steps: Optional[int]) -> tuple[Protocol, int]:
    """(the protocol, its measured steps) or a ConfigError naming the bad argument."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol!r}: choose from {', '.join(sorted(PROTOCOLS))}")
    proto = PROTOCOLS[protocol]
    measured = proto.steps if steps is None else steps
    if measured < MIN_STEPS:
        raise ConfigError(f"--steps {measured}: the {protocol} protocol measures at least {MIN_STEPS} steps")
    if (loss_target is None) != (loss_steps is None):
        raise ConfigError("--loss-target and --loss-steps go together (the target loss after that many steps)")
    if loss_steps is not None:
        if loss_steps < proto.warmup + LOSS_WINDOW:
            raise ConfigError(f"--loss-steps {loss_steps}: at least {proto.warmup + LOSS_WINDOW} (the {proto.warmup} "
                              f"warm-up steps plus the {LOSS_WINDOW} whose mean loss is compared)")
        measured = max(measured, loss_steps - proto.warmup)
    return proto, measured


def run_protocol(cfg: RunConfig, protocol: str = "internvl", steps: Optional[int] = None,
                 loss_target: Optional[float] = None, loss_steps: Optional[int] = None,
                 results: Optional[Path] = None) -> dict:
    """Measure ``cfg`` under ``protocol``; returns the result (``passed``: None without a loss target) and
    appends it as one JSON line to ``results`` when given."""
    proto, measured = check_arguments(protocol, steps, loss_target, loss_steps)
    _, model, data, device, source = prepare(cfg)
    try:
        run, _ = run_steps(cfg, data, model, source, device, proto.warmup, measured)
    finally:
        source.close()
    per_step = run["per_step"]
    world = 1  # bench runs one process; TGS divides by the GPUs the step ran on
    record: dict = {
        "protocol": proto.name, "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "hyper_parameters": hyper_parameters(cfg, world),
        "warmup_steps": proto.warmup, "measured_steps": len(per_step),
        "tgs": _spread(tgs_steps := [s["tokens"] / s["step_s"] / world for s in per_step]),
        "tgs_per_step": [round(v, 2) for v in tgs_steps],
        "samples_per_s": _spread([s["samples"] / s["step_s"] for s in per_step]),
        "step_s": _spread([s["step_s"] for s in per_step]),
        "mean_seq_len": round(sum(s["tokens"] for s in per_step) / sum(s["samples"] for s in per_step), 2),
        "passed": None,
    }
    if loss_steps is not None:
        last = loss_steps - proto.warmup  # measured steps start after the warm-up
        window = [s["loss"] for s in per_step[last - LOSS_WINDOW:last]]
        loss = statistics.fmean(window)
        record["loss"] = {"after_steps": loss_steps, "mean_of_last": LOSS_WINDOW, "value": round(loss, 5),
                          "target": loss_target}
        record["passed"] = loss <= loss_target
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return record


def format_protocol(record: dict) -> str:
    """The result as the lines ``vlmtrain bench --protocol`` prints."""
    lines = [f"protocol {record['protocol']}: {record['warmup_steps']} warm-up steps, "
             f"{record['measured_steps']} measured steps",
             "hyper-parameters (results are comparable only where these match):"]
    lines += [f"  {k:24s} {v}" for k, v in record["hyper_parameters"].items()]
    tgs, sps = record["tgs"], record["samples_per_s"]
    lines.append(f"TGS (tokens/GPU/s)       {tgs['mean']:.2f} ± {tgs['std']:.2f} (min {tgs['min']:.2f}, "
                 f"max {tgs['max']:.2f}) over {record['measured_steps']} steps; mean seq len {record['mean_seq_len']}")
    lines.append(f"samples/s                {sps['mean']:.2f} ± {sps['std']:.2f}")
    if "loss" in record:
        loss = record["loss"]
        verdict = "PASS" if record["passed"] else "FAIL"
        rel = "<=" if record["passed"] else ">"
        lines.append(f"loss after {loss['after_steps']} steps     {loss['value']:.4f} (mean of the last "
                     f"{loss['mean_of_last']}) {rel} target {loss['target']}: {verdict}")
    return "\n".join(lines)
