"""``vlmtrain report RUN [RUN ...]``: one self-contained HTML page (plots inline, no network, no other
file) of one run, or of several overlaid with a legend naming each.

The page shows loss against steps and samples seen, learning rate, throughput, MFU, the step-time
breakdown, data wait, memory per rank, rank balance, feature-cache hit rate, frames encoded per
sample, eval metrics over time, the data mixture, the summary and the config. ``vlmtrain train``
writes ``OUTPUT_DIR/report.html`` with :func:`write_run_report` when it ends.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from vlmtrain.errors import UsageError
from vlmtrain.metrics.report_data import RunData, load_run, run_labels, run_status, samples_seen, series
from vlmtrain.metrics.report_plots import plot_groups, render_figure

__all__ = ["default_output", "render_report", "write_report", "write_run_report"]

log = logging.getLogger(__name__)

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem auto;max-width:1180px;
color:#222;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:1.8rem}
nav a{margin-right:.7rem;font-size:.85rem}table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}th{background:#f5f5f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}img.plot{max-width:100%;height:auto;display:block}
.note{color:#555;font-size:.85rem;margin:.2rem 0}.missing{color:#888;font-style:italic}
.status-in-progress{color:#a15c00;font-weight:600}.status-finished{color:#2a7a2a}
main{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));column-gap:1.5rem}
section.wide{grid-column:1/-1}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.6rem;font-size:.78rem;overflow:auto;max-height:32rem}
"""

# Marks the page as loaded and counts the plots the browser decoded with a non-zero size, so a
# headless browser's dumped DOM proves every plot was drawn (tests/tools/test_report.py).
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var plots = document.querySelectorAll("img.plot"), drawn = 0;
  plots.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0 && img.naturalHeight > 0) { drawn += 1; }
    else { console.error("vlmtrain report: plot not drawn: " + img.alt); }
  });
  document.body.dataset.plots = String(plots.length);
  document.body.dataset.plotsDrawn = String(drawn);
  document.body.dataset.loaded = "1";
});
"""


# The page may load nothing from anywhere: inline style and script, data: images only (a browser
# reports any other fetch as a console error, which the browser test fails on).
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    """A table cell: numbers to 6 significant digits, containers as JSON."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_e(_fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
        else f"<td>{_e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _flatten(value: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in value.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _best(summary: dict) -> str:
    best = summary.get("best") or {}
    return f"{best['metric']} {_fmt(best['value'])} @ step {best['step']}" if best.get("metric") else ""


def _runs_section(runs: list[RunData]) -> str:
    rows = []
    for run in runs:
        notes = []
        if run.partial_last_line:
            notes.append("last metrics line incomplete (being written): skipped")
        if run.skipped_lines - run.partial_last_line > 0:
            notes.append(f"{run.skipped_lines - run.partial_last_line} unreadable metrics line(s) skipped")
        seen = [s for s in samples_seen(run) if s is not None]
        losses = series(run, "loss/train")[1]
        rows.append([run.label, str(run.path), run_status(run), run.rows[-1]["step"] if run.rows else 0,
                     int(run.summary.get("samples", seen[-1] if seen else 0)),
                     run.summary.get("final_loss", losses[-1] if losses else ""), run.summary.get("samples_per_s", ""),
                     _best(run.summary), "; ".join(notes)])
    return _table(["run", "directory", "status", "last logged step", "samples seen", "final train loss",
                   "samples/s (run)", "best", "notes"], rows)


def _mixture_section(runs: list[RunData]) -> str:
    parts = []
    for run in runs:
        sources = ((run.summary.get("data") or {}).get("sources")) or {}
        title = f"<h3>{_e(run.label)}</h3>" if len(runs) > 1 else ""
        if sources:
            cols = sorted({c for s in sources.values() if isinstance(s, dict) for c in s})
            rows = [[name, *[(s.get(c, "") if isinstance(s, dict) else "") for c in cols]]
                    for name, s in sources.items()]
            parts.append(title + _table(["source", *cols], rows))
        else:
            configured = (run.config.get("data") or {}).get("sources") or []
            if configured:
                cols = ["name", "format", "path", "percent"]
                rows = [[s.get(c, "") for c in cols] for s in configured if isinstance(s, dict)]
                parts.append(title + '<p class="note">as configured (the planned counts come with summary.json)</p>'
                             + _table(cols, rows))
            else:
                root = (run.config.get("data") or {}).get("root", "")
                reason = ("no summary.json yet (run in progress)" if run.in_progress
                          else "no data.sources in the summary")
                parts.append(title + f'<p class="missing">{_e(reason)}; data.root: {_e(root or "unknown")}</p>')
    return "".join(parts)


def _summary_section(runs: list[RunData]) -> str:
    flats = [{k: v for k, v in _flatten(r.summary).items() if not k.startswith("data.sources")} for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    missing = "".join(f'<p class="missing">{_e(r.label)}: no summary.json yet (run in progress)</p>'
                      for r in runs if r.in_progress)
    if not keys:
        return missing
    return missing + _table(["key", *[r.label for r in runs]], [[k, *[f.get(k, "") for f in flats]] for k in keys])


def _config_section(runs: list[RunData]) -> str:
    return "".join(f"<details{' open' if len(runs) == 1 else ''}><summary>{_e(r.label)}: config.yaml</summary>"
                   f"<pre>{_e(r.config_text) if r.config_text else '(no config.yaml)'}</pre></details>" for r in runs)


def render_report(runs: list[RunData]) -> str:
    """The whole report page of ``runs`` (overlaid in every plot when several) as one HTML string."""
    names = ", ".join(r.label for r in runs)
    # (anchor, title, html, wide): a section of one plot or a "not logged" line takes half the width
    sections: list[tuple[str, str, str, bool]] = [("runs", "Runs", _runs_section(runs), True)]
    plots = 0
    for group in plot_groups(runs):
        uri = render_figure(group, runs) if group.panels else None
        note = f'<p class="note">{_e(group.note)}</p>' if group.note and uri else ""
        body = (f'<img class="plot" alt="{_e(group.title)}" src="{uri}">' if uri
                else f'<p class="missing">{_e(group.missing)}</p>')
        plots += uri is not None
        sections.append((group.anchor, group.title, note + body, uri is not None and len(group.panels) > 1))
    sections += [("mixture", "Data mixture", _mixture_section(runs), True),
                 ("summary", "Summary", _summary_section(runs), True),
                 ("config", "Config", _config_section(runs), True)]
    status = "<p>" + " · ".join(f'<span class="status-{"finished" if run_status(r) == "finished" else "in-progress"}">'
                                f"{_e(r.label)}: {_e(run_status(r))}</span>" for r in runs) + "</p>"
    live = ' data-in-progress="1"' if any(r.in_progress for r in runs) else ""
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _, _ in sections)
    wide = ' class="wide"'
    body = "".join(f'<section id="{a}"{wide if w else ""}><h2>{_e(t)}</h2>{b}</section>' for a, t, b, w in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>vlmtrain report: {_e(names)}</title>'
            f'<meta name="generator" content="vlmtrain report"><meta http-equiv="Content-Security-Policy" '
            f'content="{CSP}"><style>{STYLE}</style></head>'
            f'<body data-loaded="0" data-plots-expected="{plots}"'
            f"{live}>"
            f"<h1>vlmtrain report</h1>{status}<nav>{nav}</nav><main>{body}</main>"
            f"<script>{CHECK_SCRIPT}</script></body></html>\n")


def default_output(runs: Sequence[str | Path]) -> Path:
    """Where the report goes without ``--out``: ``RUN/report.html`` for one run; several runs need
    ``--out`` (no run directory is the obvious home of a comparison)."""
    if len(runs) != 1:
        raise UsageError("report: give --out FILE when reporting several runs")
    return Path(runs[0]) / "report.html"


def write_report(runs: Sequence[str | Path], out: Optional[str | Path] = None) -> Path:
    """Read ``runs`` (run directories, a run still in progress included), write the report to ``out``
    (default :func:`default_output`) atomically, and return its path. Missing directories or
    ``metrics.jsonl`` raise FileNotFoundError; several runs without ``out`` raise UsageError."""
    if not runs:
        raise UsageError("report: give at least one run directory")
    target = Path(out) if out is not None else default_output(runs)
    labels = run_labels([str(r) for r in runs])
    data = [load_run(r, label) for r, label in zip(runs, labels)]
    page = render_report(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)  # a browser reloading the page never sees half of it
    return target


def write_run_report(run_dir: str | Path) -> Optional[Path]:
    """``RUN_DIR/report.html`` at the end of ``vlmtrain train``; never raises: a report that cannot be
    written is a logged warning, not a failed run. Returns the path, or None when it failed."""
    t0 = time.perf_counter()
    try:
        path = write_report([run_dir])
    except Exception as e:  # noqa: BLE001  (the run's results are already saved; the page is a bonus)
        log.warning("report: could not write %s: %s: %s", Path(run_dir) / "report.html", type(e).__name__, e)
        return None
    log.info("report: wrote %s in %.2fs", path, time.perf_counter() - t0)
    return path
