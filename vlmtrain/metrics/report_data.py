"""What ``vlmtrain report`` reads from a run directory: the logged metrics (a run still writing them
included), the summary and the config, plus the series its plots are drawn from.

Only the standard library here: reading a run must not pay for matplotlib.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

__all__ = ["RunData", "keys_matching", "load_run", "run_labels", "run_status", "samples_seen", "series"]


@dataclass
class RunData:
    """One run directory as the report sees it."""

    path: Path  # the run directory
    label: str  # its name in legends and table headers
    rows: list[dict]  # the parsed metrics.jsonl lines, in file order
    summary: dict = field(default_factory=dict)  # summary.json; {} while the run is in progress
    config_text: str = ""  # config.yaml as written ("" when absent)
    config: dict = field(default_factory=dict)  # config.yaml parsed ({} when absent or unreadable)
    skipped_lines: int = 0  # lines that were not JSON objects (a half-written last line of a live run)
    partial_last_line: bool = False  # the last line was cut off mid-write

    @property
    def in_progress(self) -> bool:
        """True while the run has no ``summary.json`` (still training, or killed before the end)."""
        return not self.summary


def _parse_lines(text: str) -> tuple[list[dict], int, bool]:
    """The JSON objects of a metrics file, the count of lines that were not, and whether the last
    line is one of those (a writer caught mid-line)."""
    rows: list[dict] = []
    skipped, last_bad = 0, False
    lines = [line for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        else:
            skipped += 1
            last_bad = i == len(lines) - 1
    return rows, skipped, last_bad


def _read_json(path: Path) -> dict:
    """A JSON object file, or {} when it is absent or not (yet) complete."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def load_run(path: str | Path, label: Optional[str] = None) -> RunData:
    """Read a run directory written by ``vlmtrain train``; a run still in progress (no summary, a
    truncated last metrics line) is read as far as it goes. Raises FileNotFoundError, naming the path,
    when the directory or its ``metrics.jsonl`` does not exist."""
    run = Path(path)
    if not run.is_dir():
        raise FileNotFoundError(f"report: run directory not found: {run}")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"report: {run} has no metrics.jsonl (not a run directory written by vlmtrain train)")
    rows, skipped, partial = _parse_lines(metrics.read_text(encoding="utf-8", errors="replace"))
    config_path = run / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8", errors="replace") if config_path.is_file() else ""
    config: dict = {}
    if config_text:
        import yaml  # a core dependency; only needed once there is a config

        try:
            loaded = yaml.safe_load(config_text)
            config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            config = {}
    return RunData(path=run, label=label or run.name, rows=rows, summary=_read_json(run / "summary.json"),
                   config_text=config_text, config=config, skipped_lines=skipped, partial_last_line=partial)


def run_labels(paths: list[str]) -> list[str]:
    """Legend names of the runs: each directory's name, or the path as given where two names clash."""
    names = [Path(p).resolve().name or str(p) for p in paths]
    return [name if names.count(name) == 1 else str(p) for name, p in zip(names, paths)]


def run_status(run: RunData) -> str:
    """``finished``, ``preempted at step N`` or ``in progress`` (with the last logged step)."""
    if "preempted_at_step" in run.summary:
        return f"preempted at step {run.summary['preempted_at_step']} (resumable)"
    if run.in_progress:
        last = run.rows[-1]["step"] if run.rows else 0
        return f"in progress (last logged step {last})"
    return "finished"


def _number(value: object) -> Optional[float]:
    """A finite float, or None for anything else (strings, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def series(run: RunData, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """The logged values of ``key`` against ``x``: ``"step"`` or ``"samples"`` (samples seen)."""
    xs_all = samples_seen(run) if x == "samples" else [float(r["step"]) for r in run.rows]
    xs, ys = [], []
    for xv, row in zip(xs_all, run.rows):
        y = _number(row.get(key))
        if y is not None and xv is not None:
            xs.append(xv)
            ys.append(y)
    return xs, ys


def samples_seen(run: RunData) -> list[Optional[float]]:
    """Samples trained on up to each logged step, over all ranks. Each logged window holds
    ``throughput/samples_per_s`` x ``time/step_s`` samples per step (both are the window's
    averages, so their product is exact up to rounding); a window without them counts
    ``train.batch_size`` samples per step (the global batch)."""
    batch = _number((run.config.get("train") or {}).get("batch_size")) or 0.0
    total, previous, out = 0.0, 0, []
    for row in run.rows:
        steps = max(int(row["step"]) - previous, 0)
        rate, step_s = _number(row.get("throughput/samples_per_s")), _number(row.get("time/step_s"))
        per_step = rate * step_s if rate is not None and step_s is not None else batch
        total += per_step * steps
        previous = max(previous, int(row["step"]))
        out.append(round(total, 1) if per_step else None)
    return out


def keys_matching(runs: list[RunData], accept: Callable[[str], bool]) -> list[str]:
    """The metric keys any run logged with a number that ``accept`` takes, sorted."""
    found = {k for run in runs for row in run.rows for k, v in row.items() if accept(k) and _number(v) is not None}
    return sorted(found)
