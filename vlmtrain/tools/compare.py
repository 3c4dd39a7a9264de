"""``vlmtrain compare``: configs and runs side by side, with what `vlmtrain plan` predicts for configs.

Each column is a YAML config or a run directory written by ``vlmtrain train`` (``config.yaml``,
``summary.json``, ``metrics.jsonl``). A :class:`Comparison` holds the settings (grouped, each marked
whether it differs), quantities derived from them (per-device micro-batch, global batch, warmup,
total time at a given s/it, and for configs what ``vlmtrain plan`` predicts: ``compare_plan.py``),
what runs measured (s/it, throughput, memory, the loss at equal samples seen, the best validation
metric) and the reasons two columns are not comparable.
``tools/compare_render.py`` writes it as Markdown or HTML; :meth:`Comparison.to_json` as JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vlmtrain.config import RunConfig, flatten, source_name_and_percent
from vlmtrain.errors import UsageError
from vlmtrain.tools.compare_checks import not_comparable, sources_text
from vlmtrain.tools.compare_inputs import Column, load_column, parse_s_per_it
from vlmtrain.tools.compare_measured import Row, fmt_hours, fmt_num, measured_rows, row as _row
from vlmtrain.tools.compare_plan import PlanOutcome, plan_columns, plan_rows

__all__ = ["ABSENT", "Column", "Comparison", "Row", "Setting", "compare", "load_column", "parse_s_per_it",
           "setting_group"]

ABSENT = "—"  # a key one column has and another lacks (a source only one config lists)
GROUPS = ("model", "LoRA", "data", "loader", "batch", "optimizer", "training", "parallel", "memory", "other")
_LOADER = {"data.workers", "data.load_workers", "data.prefetch_factor", "data.persistent_workers"}
_BATCH = {"train.batch_size", "train.grad_accum"}
_SECTIONS = {"model": "model", "data": "data", "optim": "optimizer", "train": "training",
             "parallel": "parallel", "memory": "memory"}


@dataclass
class Setting:
    """One config key across the columns."""

    group: str
    key: str
    values: list[Any]

    @property
    def differs(self) -> bool:
        """Whether the columns disagree on it."""
        return any(v != self.values[0] for v in self.values[1:])


@dataclass
class Comparison:
    """Everything ``vlmtrain compare`` prints."""

    columns: list[Column]
    settings: list[Setting]
    derived: list[Row]
    measured: list[Row]
    not_comparable: list[str]
    plan_notes: list[str] = dataclasses.field(default_factory=list)  # "LABEL: assumption" of each plan

    def to_json(self) -> dict:
        """The comparison as plain JSON values (raw numbers, not printed text)."""
        rows = lambda rs: [{"name": r.name, "values": r.values, "text": r.text} for r in rs]  # noqa: E731
        return {"columns": [{"label": c.label, "path": c.path, "kind": c.kind, "ranks": c.ranks,
                             "s_per_it": c.s_per_it} for c in self.columns],
                "settings": [{"group": s.group, "key": s.key, "values": s.values, "differs": s.differs}
                             for s in self.settings],
                "derived": rows(self.derived), "measured": rows(self.measured),
                "not_comparable": self.not_comparable, "plan_notes": self.plan_notes}


def setting_group(key: str) -> str:
    """The heading a flattened config key is listed under, e.g. ``model.lora_rank`` -> ``LoRA``."""
    if key == "model.lora" or key.startswith("model.lora_"):
        return "LoRA"
    if key in _LOADER:
        return "loader"
    if key in _BATCH:
        return "batch"
    return _SECTIONS.get(key.split(".", 1)[0], "other") if "." in key else "other"


def _settings_of(cfg: RunConfig) -> dict[str, Any]:
    """Flattened config keys; a source list as its names (``name%N``), then one ``data.sources[NAME]``
    key per source with its format and path (so an added source is one row, not a changed list)."""
    out: dict[str, Any] = {}
    for key, value in flatten(dataclasses.asdict(cfg)).items():
        if key not in ("data.sources", "data.val_sources"):
            out[key] = value
            continue
        sources = getattr(cfg.data, key.split(".")[1])
        out[key] = sources_text(sources) or []
        for i, src in enumerate(sources):
            name, _ = source_name_and_percent(src, f"{key}[{i}]")
            out[f"{key}[{name}]"] = f"{src.format} at {src.path}" + (
                f", image_root {src.image_root}" if src.image_root else "")
    return out


def _settings(columns: list[Column]) -> list[Setting]:
    flats = [_settings_of(c.cfg) for c in columns]
    keys: list[str] = []
    for flat in flats:  # a key only a later column has goes after its predecessor there
        at = 0
        for k in flat:
            if k not in keys:
                keys.insert(at, k)
            at = keys.index(k) + 1
    settings = [Setting(setting_group(k), k, [flat.get(k, ABSENT) for flat in flats]) for k in keys]
    return sorted(settings, key=lambda s: GROUPS.index(s.group))  # stable: config order within a group


def _steps(c: Column) -> Optional[int]:
    # A run's config.yaml holds the resolved length; a config with train.epochs needs its data.
    return c.cfg.train.steps if c.kind == "run" or c.cfg.train.epochs <= 0 else None


def _warmup(c: Column) -> Optional[int]:
    steps, o = _steps(c), c.cfg.optim
    if o.warmup_ratio > 0:
        return math.ceil(o.warmup_ratio * steps) if steps is not None else None
    return o.warmup_steps


def _trainable_share(c: Column) -> Optional[float]:
    t = c.cfg.train
    if c.cfg.model.family == "composed" and not (t.freeze_vision or t.freeze_projector or t.freeze_llm):
        return 1.0  # every parameter of the composed model trains; anything else needs the model's sizes
    return None


def _s_per_it(c: Column) -> tuple[Optional[float], str]:
    if c.s_per_it is not None:
        return c.s_per_it, "given"
    times = [m["time/step_s"] for m in c.metrics if "time/step_s" in m]
    return (sum(times) / len(times), "measured") if times else (None, "")


def _derived(columns: list[Column]) -> list[Row]:
    def per_device(c: Column) -> float:
        return c.cfg.train.batch_size / (c.ranks * c.cfg.train.grad_accum)

    timing = [_s_per_it(c) for c in columns]
    steps = [_steps(c) for c in columns]
    rows = [
        _row("ranks (GPUs)", [c.ranks for c in columns], str),
        _row("per-device micro-batch", [per_device(c) for c in columns], fmt_num),
        _row("gradient accumulation", [c.cfg.train.grad_accum for c in columns], str),
        _row("global batch (samples per step)", [c.cfg.train.batch_size for c in columns], lambda v: f"{v:,}"),
        Row("steps", steps, [f"{s:,}" if s is not None else f"{c.cfg.train.epochs:g} epochs (steps: the data's)"
                             for s, c in zip(steps, columns)]),
        _row("warmup steps", [_warmup(c) for c in columns], lambda v: f"{v:,}"),
    ]
    share = [_trainable_share(c) for c in columns]
    if any(v is not None for v in share):
        rows.append(_row("trainable share", share, lambda v: f"{100 * v:g} %"))
    if any(t for t, _ in timing):
        rows.append(Row("s/it", [t for t, _ in timing],
                        [f"{fmt_num(t)} ({how})" if t else "—" for t, how in timing]))
        total = [s * t if s is not None and t else None for s, (t, _) in zip(steps, timing)]
        rows.append(_row("total time (steps x s/it)", total, fmt_hours))
    return rows


def _plan_notes(columns: list[Column], plans: list[PlanOutcome]) -> list[str]:
    notes = []
    for c, p in zip(columns, plans):
        if p.report:
            notes += [f"{c.label}: MFU {p.report['compute']['mfu']:g} ({p.report['compute']['mfu_source']})"]
            notes += [f"{c.label}: {a}" for a in p.report["assumptions"]]
    return notes


def compare(paths: list[str | Path], gpus: int = 1, s_per_it: Optional[str] = None, plan: bool = True,
            gpu: str = "h100", mfu: Optional[float] = None) -> Comparison:
    """Compare configs and run directories; ``gpus``: ranks of the config columns; ``s_per_it``: the
    ``--s-per-it`` text (one value per column); ``plan``: also run ``vlmtrain plan`` on each config
    column (on ``gpus`` GPUs of kind ``gpu`` at ``mfu``) for its predicted time and memory; a config
    whose model or data is absent says why instead. Raises UsageError, FileNotFoundError or
    ConfigError for a bad input."""
    if len(paths) < 2:
        raise UsageError(f"compare needs at least two configs or run directories, got {len(paths)}")
    if gpus <= 0:
        raise UsageError(f"--gpus {gpus}: must be > 0")
    times = parse_s_per_it(s_per_it, len(paths))
    columns = [load_column(p, gpus, t) for p, t in zip(paths, times)]
    labels = [c.label for c in columns]
    for c in columns:
        if labels.count(c.label) > 1:  # two runs named "run" in different folders: show the paths
            c.label = c.path
    plans = plan_columns(columns, gpu, mfu) if plan else []
    return Comparison(columns, _settings(columns), _derived(columns) + plan_rows(plans), measured_rows(columns),
                      not_comparable(columns), _plan_notes(columns, plans))
