"""What the run-directory columns of ``vlmtrain compare`` measured (``summary.json``, ``metrics.jsonl``),
and the number formats every table of the comparison uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from vlmtrain.tools.compare_inputs import Column

__all__ = ["Row", "fmt_hours", "fmt_num", "loss_at_samples", "measured_rows", "row"]


@dataclass
class Row:
    """A derived or measured quantity: raw values (None: unknown) and their printed text."""

    name: str
    values: list[Any]
    text: list[str]


def row(name: str, values: list[Any], fmt: Callable[[Any], str]) -> Row:
    """A row whose known values are printed with ``fmt`` and unknown ones (None) as a dash."""
    return Row(name, values, [fmt(v) if v is not None else "—" for v in values])


def fmt_num(v: float) -> str:
    """A whole number as is (thousands separated), else 3 significant digits (``6.11``, ``0.0523``);
    at 100 and more no decimals (``8,641``)."""
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt_hours(seconds: float) -> str:
    """Seconds as hours with the seconds beside them: ``11.3 h (40,670 s)``."""
    hours = seconds / 3600
    h = f"{hours:.1f}" if hours >= 1 else f"{hours:.2g}"
    s = f"{seconds:,.0f}" if seconds >= 10 else f"{seconds:.3g}"
    return f"{h} h ({s} s)"


def _mean(metrics: list[dict], key: str) -> Optional[float]:
    values = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
    return sum(values) / len(values) if values else None


def _loss_curve(c: Column) -> list[tuple[float, float]]:
    """(samples seen = logged step x train.batch_size, loss/train) of a run, by step."""
    points = [(m["step"] * c.cfg.train.batch_size, m["loss/train"]) for m in c.metrics
              if "step" in m and isinstance(m.get("loss/train"), (int, float))]
    return sorted(points)


def loss_at_samples(curve: list[tuple[float, float]], samples: float) -> Optional[float]:
    """The loss linearly interpolated at ``samples`` between logged points (None outside them)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= samples <= x1:
            return y0 if x1 == x0 else y0 + (samples - x0) / (x1 - x0) * (y1 - y0)
    return curve[0][1] if curve and curve[0][0] == samples else None


def _memory(c: Column, kind: str) -> Optional[tuple[float, float]]:
    """Largest logged peak of the most and of the least loaded rank (one rank: both the same), GiB."""
    key = f"memory/peak_{kind}_gib"
    high, low = [m[f"{key}_max"] for m in c.metrics if f"{key}_max" in m], \
        [m[f"{key}_min"] for m in c.metrics if f"{key}_min" in m]
    if not high:
        high = low = [m[key] for m in c.metrics if key in m]
    return (max(high), max(low)) if high and low else None


def _summary_or_mean(c: Column, key: str) -> Optional[float]:
    """The summary's whole-run value, else the mean of the logged ``throughput/<key>`` windows."""
    value = c.summary.get(key)
    return value if isinstance(value, (int, float)) else _mean(c.metrics, f"throughput/{key}")


def _best(summary: dict) -> Optional[dict]:
    best = summary.get("best")
    return best if isinstance(best, dict) and best.get("value") is not None else None


def measured_rows(columns: list[Column]) -> list[Row]:
    """Measured quantities of the run columns (config columns: a dash); empty without a run column.
    A row is left out when no column has a value for it."""
    runs = [c for c in columns if c.kind == "run"]
    if not runs:
        return []
    pick = lambda f: [f(c) if c.kind == "run" else None for c in columns]  # noqa: E731
    s = lambda key: pick(lambda c: c.summary.get(key))  # noqa: E731
    rows = [
        row("steps trained", pick(lambda c: c.summary.get("steps") or max((m.get("step", 0) for m in c.metrics),
                                                                           default=None)), lambda v: f"{v:,}"),
        row("s/it (mean time/step_s)", pick(lambda c: _mean(c.metrics, "time/step_s")), fmt_num),
        row("samples/s (samples / wall time)", pick(lambda c: _summary_or_mean(c, "samples_per_s")), fmt_num),
        row("tokens/s (tokens / wall time)", pick(lambda c: _summary_or_mean(c, "tokens_per_s")), fmt_num),
        row("TGS (tokens/s per GPU, mean of logged windows)", pick(lambda c: _mean(c.metrics, "throughput/tgs")),
            fmt_num),
        row("MFU", pick(lambda c: _mean(c.metrics, "throughput/mfu")), lambda v: f"{100 * v:.1f} %"),
        row("peak allocated GiB per rank (max / min)", pick(lambda c: _memory(c, "allocated")),
            lambda v: f"{v[0]:.2f} / {v[1]:.2f}"),
        row("peak reserved GiB per rank (max / min)", pick(lambda c: _memory(c, "reserved")),
            lambda v: f"{v[0]:.2f} / {v[1]:.2f}"),
    ]
    curves = {id(c): _loss_curve(c) for c in runs}
    if len(runs) >= 2 and all(curves.values()):
        common = min(curve[-1][0] for curve in curves.values())  # the most samples every run reached
        rows.append(row(f"loss at {common:,} samples seen", pick(lambda c: loss_at_samples(curves[id(c)], common)),
                        lambda v: f"{v:.4f}"))
    rows += [
        row("final loss", s("final_loss"), lambda v: f"{v:.4f}"),
        row("best validation metric", pick(lambda c: _best(c.summary)),
            lambda b: f"{b.get('metric', '?')} {b['value']:.4g} (step {b.get('step', '?')})"),
        row("wall time", s("train_wall_s"), fmt_hours),
        row("trainable parameters", pick(lambda c: sum(c.summary["trainable_parameters"].values())
                                         if isinstance(c.summary.get("trainable_parameters"), dict) else None),
            lambda v: f"{v:,}"),
    ]
    return [r for r in rows if any(v is not None for v in r.values)]
