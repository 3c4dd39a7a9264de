"""What ``vlmtrain plan`` predicts for the config columns of ``vlmtrain compare``: samples and steps
per epoch, the steps of an epoch-based config, the trainable share, the predicted step and total time
at a MFU, and the memory per rank of the configured backend.

A config whose model or data is not on this machine cannot be planned; its column then says why
(one line, from the plan's own error) and the comparison goes on without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vlmtrain.tools.compare_inputs import Column
from vlmtrain.tools.compare_measured import Row, fmt_hours, fmt_num, row

__all__ = ["PlanOutcome", "plan_columns", "plan_rows"]


@dataclass
class PlanOutcome:
    """A column's plan report, or why there is none (``why``; empty for a run directory)."""

    report: Optional[dict]
    why: str = ""


def plan_columns(columns: list[Column], gpu: str = "h100", mfu: Optional[float] = None) -> list[PlanOutcome]:
    """Plan every config column on ``column.ranks`` GPUs of kind ``gpu`` at ``mfu`` (None: the plan's
    default: a matching bench result, else its stated assumption). A config that cannot be planned
    here (a missing model directory or data path, an unsupported architecture) gets the reason; a run
    directory gets no plan (it has measured figures)."""
    from vlmtrain.tools.plan import build_plan_report, check_plan_args

    check_plan_args(1, 1, gpu, mfu)
    out = []
    for c in columns:
        if c.kind != "config":
            out.append(PlanOutcome(None))
            continue
        try:
            out.append(PlanOutcome(build_plan_report(c.cfg, gpus=c.ranks, gpu=gpu, mfu=mfu)))
        except (OSError, ValueError) as e:  # FileNotFoundError, ConfigError, DataError: the plan's one-liners
            out.append(PlanOutcome(None, f"{type(e).__name__}: {e}".splitlines()[0]))
    return out


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.3g} GiB"


def plan_rows(plans: list[PlanOutcome]) -> list[Row]:
    """The derived rows the plans give (none when no column was planned)."""
    reports = [p.report for p in plans]
    if not any(reports):
        why = [p.why for p in plans]
        return [Row("plan", [None] * len(plans), [f"— ({w})" if w else "—" for w in why])] if any(why) else []

    def pick(fn):
        return [fn(r) if r else None for r in reports]

    def configured(r: dict) -> dict:
        return next(m for m in r["memory"].values() if m["configured"])

    rows = []
    if any(p.why for p in plans):
        rows.append(Row("plan", [None] * len(plans),
                        [f"— ({p.why})" if p.why else ("planned" if p.report else "—") for p in plans]))
    params = pick(lambda r: r["parameters"]["all"])
    rows += [
        row("samples per epoch (plan)", pick(lambda r: r["data"]["samples"]), lambda v: f"{v:,}"),
        row("steps per epoch (plan)", pick(lambda r: r["batch"]["steps_per_epoch"]), lambda v: f"{v:,}"),
        row("steps (plan)", pick(lambda r: r["batch"]["total_steps"]), lambda v: f"{v:,}"),
        Row("trainable parameters (plan)", [p["trainable"] / p["total"] if p else None for p in params],
            [f"{p['trainable']:,} of {p['total']:,} ({100 * p['trainable'] / p['total']:.3g} %)" if p else "—"
             for p in params]),
        Row("predicted s/it (plan)", pick(lambda r: r["compute"]["step_s"]),
            [f"{fmt_num(r['compute']['step_s'])} at MFU {r['compute']['mfu']:g} on {r['hardware']['gpu']}"
             if r else "—" for r in reports]),
        row("predicted total time (plan)", pick(lambda r: r["compute"]["total_s"]), fmt_hours),
        Row("memory per rank (plan)", pick(lambda r: configured(r)["total"]),
            [f"{_gib(configured(r)['total'])} ({next(k for k, m in r['memory'].items() if m['configured'])}; "
             f"{'fits' if configured(r)['fits'] else 'does not fit'} {r['hardware']['gpu']})" if r else "—"
             for r in reports]),
    ]
    return rows
