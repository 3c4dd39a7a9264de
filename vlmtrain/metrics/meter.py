"""Per-step measurements averaged between log steps, with fixed namespaced keys."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from vlmtrain.data.loader import Batch
from vlmtrain.metrics.flops import ModelFlops, mfu, tgs


def step_counts(micro: Sequence[Batch], frames_encoded: int, spatial_encoded: int = 0) -> dict[str, float]:
    """What one step's micro-batches hold: samples, real and computed tokens, frames, cache hits (of the
    spatial branch's cache too)."""
    hits = sum(int(b.cached.hits.sum()) for b in micro if b.cached is not None)
    looked_up = sum(len(b.cached.hits) for b in micro if b.cached is not None)
    return {
        "spatial_encoded": spatial_encoded,
        "spatial_hits": sum(int(b.spatial_cached.hits.sum()) for b in micro if b.spatial_cached is not None),
        "spatial_looked_up": sum(len(b.spatial_cached.hits) for b in micro if b.spatial_cached is not None),
        "samples": sum(b.num_samples for b in micro),
        "tokens": sum(b.num_tokens for b in micro),
        "computed_tokens": sum(b.computed_tokens for b in micro),
        "labels": sum(b.num_label_tokens for b in micro),
        "slots": sum(b.num_slots for b in micro),
        "visual": sum(b.num_visual_tokens for b in micro),
        "unique": sum(int(b.pixels.shape[0]) for b in micro),
        "encoded": frames_encoded,
        "hits": hits,
        "looked_up": looked_up,
        "token_ratio": micro[0].token_ratio,
        "vision_ratio": micro[0].vision_ratio,
    }


# Window counts that add up over ranks (the balance ratios are the same on every rank and are not summed).
SUMMED_OVER_RANKS = ("samples", "tokens", "computed_tokens", "labels", "slots", "visual", "unique", "encoded", "hits",
                     "looked_up", "spatial_encoded", "spatial_hits", "spatial_looked_up")


class StepMeter:
    """Accumulates steps; ``flush`` returns the averages since the last flush.

    ``flops``: the model's FLOPs model (adds ``throughput/tflops`` and, with a known device ``peak``
    FLOP/s, ``throughput/mfu``); ``world_size``: devices the step runs on (TGS divides by it);
    ``reduce_sum``: sums a list of values over ranks (``dist.init.all_reduce_values(..., "sum")``), so a
    multi-process run's throughput and FLOPs count every rank's samples (a collective in ``flush``).
    """

    def __init__(self, flops: Optional[ModelFlops] = None, peak: Optional[float] = None, world_size: int = 1,
                 reduce_sum: Optional[Callable[[list[float]], list[float]]] = None, skipped: int = 0) -> None:
        self.flops, self.peak, self.world_size = flops, peak, world_size
        self.reduce_sum = reduce_sum
        self._reset()
        self._totals = {"wall_s": 0.0, "samples": 0, "tokens": 0}
        self.last_loss = float("nan")
        self.skipped_total = skipped  # non-finite steps of the run (``skipped``: a resumed run's checkpoint count)

    def _reset(self) -> None:
        self._n = 0
        self._skipped = 0  # steps of the window whose loss or grad norm was non-finite (no update)
        self._sum = {"loss": 0.0, "grad_norm": 0.0, "data_s": 0.0, "step_s": 0.0, "flops": 0.0}
        self._c: dict[str, float] = {}
        self._extra: dict[str, float] = {}  # namespaced values a step returns itself (e.g. deepspeed/fwd_ms)
        self._lr = 0.0
        self._spatial = False  # a step reported its spatial branch's encoder count

    def update(self, micro: Sequence[Batch], result: dict[str, float], data_s: float, step_s: float, lr: float) -> None:
        """Record one optimizer step. Keys of ``result`` with a namespace (``deepspeed/fwd_ms``) are
        averaged over the window and logged under their own name (this rank's values)."""
        self._n += 1
        for k, v in result.items():
            if "/" in k:
                self._extra[k] = self._extra.get(k, 0.0) + float(v)
        self._spatial = self._spatial or "spatial_encoded" in result
        nonfinite = bool(result.get("nonfinite", False))
        self._skipped += nonfinite
        self.skipped_total += nonfinite
        finite = () if nonfinite else (("loss", result["loss"]), ("grad_norm", result["grad_norm"]))
        for k, v in (*finite, ("data_s", data_s), ("step_s", step_s)):
            self._sum[k] += v
        counts = step_counts(micro, int(result.get("frames_encoded", sum(int(b.pixels.shape[0]) for b in micro))),
                             int(result.get("spatial_encoded", 0)))
        for k, v in counts.items():
            self._c[k] = self._c.get(k, 0) + v
        if self.flops is not None:
            docs = [n for b in micro for row in b.doc_lengths for n in row]
            self._sum["flops"] += self.flops.step(docs, counts["unique"], counts["encoded"], counts["labels"],
                                                  counts["spatial_encoded"])
        self._lr = lr
        self._totals["wall_s"] += step_s
        self._totals["samples"] += counts["samples"]
        self._totals["tokens"] += counts["tokens"]
        if not nonfinite:
            self.last_loss = result["loss"]

    def flush(self, epoch: float) -> dict[str, float]:
        """Averages since the last flush under fixed keys; resets the window."""
        n, s, c = max(self._n, 1), self._sum, self._c
        finite_n = self._n - self._skipped  # loss and grad norm average the steps that updated
        if self.reduce_sum is not None:
            keys = [k for k in SUMMED_OVER_RANKS if k in c]
            summed = self.reduce_sum([c[k] for k in keys] + [s["flops"]])
            c, s = {**c, **dict(zip(keys, summed))}, {**s, "flops": summed[-1]}
        wall = max(s["step_s"], 1e-9)
        samples = max(c.get("samples", 0), 1)
        out = {
            **({"loss/train": round(s["loss"] / finite_n, 6)} if finite_n else {}),
            "optim/lr": self._lr,
            **({"optim/grad_norm": round(s["grad_norm"] / finite_n, 6)} if finite_n else {}),
            "train/nonfinite_skipped": self._skipped,
            "throughput/samples_per_s": round(c.get("samples", 0) / wall, 2),
            "throughput/tokens_per_s": round(c.get("tokens", 0) / wall, 1),
            "throughput/tgs": round(tgs(c.get("samples", 0) / wall, c.get("tokens", 0) / samples, self.world_size), 1),
            "data/images_per_sample": round(c.get("slots", 0) / samples, 3),
            "data/visual_tokens_per_sample": round(c.get("visual", 0) / samples, 2),
            "data/padding_efficiency": round(c.get("tokens", 0) / max(c.get("computed_tokens", 0), 1), 4),
            "vision/frames_encoded_per_sample": round(c.get("encoded", 0) / samples, 3),
            "vision/unique_frames_per_sample": round(c.get("unique", 0) / samples, 3),
            "data/tokens_per_sample": round(c.get("tokens", 0) / samples, 2),
            "balance/tokens_max_over_min": round(c.get("token_ratio", n) / n, 4),
            "balance/vision_max_over_min": round(c.get("vision_ratio", n) / n, 4),
            "time/step_s": round(wall / n, 5),
            "time/data_wait_pct": round(100.0 * s["data_s"] / wall, 2),
            "train/epoch": round(epoch, 4),
            **{k: round(v / n, 4) for k, v in self._extra.items()},
        }
        if c.get("looked_up"):
            out["cache/hit_rate"] = round(c["hits"] / c["looked_up"], 4)
        if self._spatial:
            out["spatial/frames_encoded_per_sample"] = round(c.get("spatial_encoded", 0) / samples, 3)
        if c.get("spatial_looked_up"):
            out["spatial/cache_hit_rate"] = round(c["spatial_hits"] / c["spatial_looked_up"], 4)
        if self.flops is not None:
            per_device = s["flops"] / wall / self.world_size
            out["throughput/tflops"] = round(per_device / 1e12, 4)
            util = mfu(per_device, self.peak)
            if util is not None:
                out["throughput/mfu"] = round(util, 4)
        self._reset()
        return out

    def window_times(self) -> dict[str, float]:
        """This rank's mean step time and data wait in seconds since the last flush (``time/step_s``,
        ``time/data_wait_s``): call before ``flush``; a multi-process run logs their spread over ranks."""
        n = max(self._n, 1)
        return {"time/step_s": self._sum["step_s"] / n, "time/data_wait_s": self._sum["data_s"] / n}

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
