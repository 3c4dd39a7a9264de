"""Per-step measurements averaged between log steps, with fixed namespaced keys."""

from __future__ import annotations

from typing import Sequence

from vlmtrain.data.loader import Batch


class StepMeter:
    """Accumulates steps; ``flush`` returns the averages since the last flush."""

    def __init__(self) -> None:
        self._reset()
        self._totals = {"wall_s": 0.0, "samples": 0, "tokens": 0}
        self.last_loss = float("nan")

    def _reset(self) -> None:
        self._n = 0
        self._sum = {"loss": 0.0, "grad_norm": 0.0, "data_s": 0.0, "step_s": 0.0}
        self._samples = self._tokens = self._slots = self._unique = self._visual = 0
        self._lr = 0.0

    def update(self, micro: Sequence[Batch], result: dict[str, float], data_s: float, step_s: float, lr: float) -> None:
        """Record one optimizer step."""
        self._n += 1
        for k, v in (("loss", result["loss"]), ("grad_norm", result["grad_norm"]), ("data_s", data_s), ("step_s", step_s)):
            self._sum[k] += v
        samples = sum(b.num_samples for b in micro)
        tokens = sum(b.num_tokens for b in micro)
        self._samples += samples
        self._tokens += tokens
        self._slots += sum(b.num_slots for b in micro)
        self._visual += sum(b.num_visual_tokens for b in micro)
        self._unique += sum(int(b.pixels.shape[0]) for b in micro)
        self._lr = lr
        self._totals["wall_s"] += step_s
        self._totals["samples"] += samples
        self._totals["tokens"] += tokens
        self.last_loss = result["loss"]

    def flush(self, epoch: float) -> dict[str, float]:
        """Averages since the last flush under fixed keys; resets the window."""
        n, s = max(self._n, 1), self._sum
        wall = max(s["step_s"], 1e-9)
        out = {
            "loss/train": round(s["loss"] / n, 6),
            "optim/lr": self._lr,
            "optim/grad_norm": round(s["grad_norm"] / n, 6),
            "throughput/samples_per_s": round(self._samples / wall, 2),
            "throughput/tokens_per_s": round(self._tokens / wall, 1),
            "data/images_per_sample": round(self._slots / max(self._samples, 1), 3),
            "data/visual_tokens_per_sample": round(self._visual / max(self._samples, 1), 2),
            "vision/frames_encoded_per_sample": round(self._unique / max(self._samples, 1), 3),
            "data/tokens_per_sample": round(self._tokens / max(self._samples, 1), 2),
            "time/step_s": round(wall / n, 5),
            "time/data_wait_pct": round(100.0 * s["data_s"] / wall, 2),
            "train/epoch": round(epoch, 4),
        }
        self._reset()
        return out

    def pop_totals(self, previous: dict) -> dict:
        """Add the totals since the last pop to ``previous`` (a checkpoint's running totals)."""
        merged = {k: previous.get(k, 0) + v for k, v in self._totals.items()}
        self._totals = {"wall_s": 0.0, "samples": 0, "tokens": 0}
        return merged

    def summary(self, steps: int, totals: dict, data_stats: dict, trainable: dict) -> dict:
        """The run summary written to ``summary.json``."""
        wall = max(totals["wall_s"], 1e-9)
        return {
            "steps": steps,
            "samples": totals["samples"],
            "train_wall_s": round(totals["wall_s"], 2),
            "samples_per_s": round(totals["samples"] / wall, 2),
            "tokens_per_s": round(totals["tokens"] / wall, 1),
            "final_loss": self.last_loss,
            "trainable_parameters": trainable,
            "data": data_stats,
        }
