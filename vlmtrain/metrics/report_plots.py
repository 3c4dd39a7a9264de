"""The plots of ``vlmtrain report``: one matplotlib figure per metric group, rendered headless (no
pyplot, no display) to SVG and returned as a ``data:`` URI so the page needs no other file.

matplotlib is imported inside :func:`render_figure` only: importing this module costs nothing.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from typing import Callable, Optional

from vlmtrain.metrics.report_data import RunData, keys_matching, series

__all__ = ["Panel", "PlotGroup", "plot_groups", "render_figure"]

# One colour per run (matplotlib's default cycle) and one line style per metric within a panel.
LINESTYLES = ("-", "--", ":", "-.")
COUNT_KEYS = ("eval/episodes", "val/samples")  # how many episodes / samples were scored, not a quality


@dataclass
class Panel:
    """One axes: ``keys`` against ``x`` (``"step"`` or ``"samples"``)."""

    title: str
    keys: list[str]
    ylabel: str = ""
    x: str = "step"
    logy: bool = False


@dataclass
class PlotGroup:
    """One report section: its panels (empty when nothing of it was logged) and why it may be missing."""

    anchor: str  # the section's HTML id
    title: str
    panels: list[Panel]
    missing: str  # shown instead of a plot when ``panels`` is empty
    note: str = ""  # what the plot shows, one sentence


def _base(key: str) -> str:
    """A key without the ``_max`` / ``_min`` of a multi-rank spread."""
    return re.sub(r"_(max|min)$", "", key)


def _by_base(keys: list[str], **panel_args) -> list[Panel]:
    """One panel per metric, its max / min over ranks drawn in the same axes."""
    bases: dict[str, list[str]] = {}
    for k in keys:
        bases.setdefault(_base(k), []).append(k)
    return [Panel(title=b, keys=ks, **panel_args) for b, ks in bases.items()]


def plot_groups(runs: list[RunData]) -> list[PlotGroup]:
    """Every metric group of the report, in page order, with the panels the runs have data for."""
    def having(*keys: str) -> list[str]:
        return keys_matching(runs, lambda k: k in keys)

    def prefixed(prefix: str, keep: Callable[[str], bool] = lambda k: True) -> list[str]:
        return keys_matching(runs, lambda k: k.startswith(prefix) and keep(k))

    loss = having("loss/train", "val/loss")
    time_keys = prefixed("time/", lambda k: "_pct" not in k)
    evals = keys_matching(runs, lambda k: k.startswith(("eval/", "val/")) and k not in COUNT_KEYS)
    per_source = {k.split("/")[1] for k in evals if k.startswith("val/") and k.count("/") == 2}
    if len(per_source) == 1:  # val/<source>/* of the only source repeat val/*
        evals = [k for k in evals if not (k.startswith("val/") and k.count("/") == 2)]
    def one(title: str, keys: list[str], ylabel: str) -> list[Panel]:
        return [Panel(title, keys, ylabel)] if keys else []

    memory = prefixed("memory/", lambda k: _base(k).endswith("_gib"))
    return [
        PlotGroup("loss", "Loss",
                  [Panel("loss against steps", loss, "loss", "step", logy=True),
                   Panel("loss against samples seen", loss, "loss", "samples", logy=True)] if loss else [],
                  "not logged", "Training loss (window mean) and validation loss; samples seen count every rank."),
        PlotGroup("lr", "Learning rate", one("learning rate", having("optim/lr"), "lr"), "not logged"),
        PlotGroup("throughput", "Throughput",
                  [Panel(k.split("/")[1], [k], k.split("/")[1])
                   for k in having("throughput/samples_per_s", "throughput/tokens_per_s")],
                  "not logged", "Samples and tokens per second of the logged window, all ranks together."),
        PlotGroup("mfu", "MFU", one("model FLOPs utilisation", having("throughput/mfu"), "MFU"),
                  "not logged (needs a known device peak: a CUDA device of a known kind)"),
        PlotGroup("step-time", "Step time breakdown", one("time/*", time_keys, "seconds"),
                  "not logged", "Every time/* key the runs logged (a multi-rank run: max / min over ranks)."),
        PlotGroup("data-wait", "Data wait", _by_base(prefixed("time/", lambda k: "_pct" in k), ylabel="% of step time"),
                  "not logged", "Share of the step spent waiting for the next batch."),
        PlotGroup("memory", "Memory per rank", _by_base(memory, ylabel="GiB"), "not logged (CUDA runs only)",
                  "Peak memory per step; a multi-rank run: max and min over ranks."),
        PlotGroup("balance", "Rank balance", one("balance/*", prefixed("balance/"), "max / min over ranks"),
                  "not logged", "1.0 means every rank got the same work."),
        PlotGroup("cache", "Feature-cache hit rate", one("cache/hit_rate", having("cache/hit_rate"), "hit rate"),
                  "not logged (the run read no feature cache)"),
        PlotGroup("frames", "Frames encoded per sample", one("vision/*", prefixed("vision/"), "frames / sample"),
                  "not logged", "Frames the vision encoder ran on (after de-duplication and cache hits) per sample."),
        PlotGroup("eval", "Evaluation metrics", [Panel(k, [k], k.split("/")[-1]) for k in evals],
                  "not logged (the run had no validation: eval.every=0)",
                  "eval/*: closed-loop rollouts; val/*: held-out samples; one panel per metric."),
    ]


def _short(key: str) -> str:
    return key.split("/", 1)[-1] if "/" in key else key


def _label(run: RunData, key: str, n_runs: int, n_keys: int) -> str:
    if n_runs > 1 and n_keys > 1:
        return f"{run.label} · {_short(key)}"
    return run.label if n_runs > 1 else key


def render_figure(group: PlotGroup, runs: list[RunData], columns: int = 2) -> Optional[str]:
    """The group's panels as one SVG figure in a ``data:image/svg+xml;base64,...`` URI, one colour
    per run (named in each legend), one line style per metric; None when no panel has data."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display is ever needed (a training node has none)
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    panels = [p for p in group.panels if any(series(r, k, p.x)[0] for r in runs for k in p.keys)]
    if not panels:
        return None
    cols = min(3 if len(panels) > 4 else columns, len(panels))
    rows = -(-len(panels) // cols)
    with matplotlib.rc_context({"svg.hashsalt": "vlmtrain-report", "font.size": 9, "axes.titlesize": 10}):
        width, height = 5.4 * cols, 3.3 * rows
        fig = Figure(figsize=(width, height))
        # Fixed margins in inches: half the time of a constrained layout, which a train run's end pays.
        fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.3 / height,
                            wspace=0.32, hspace=0.55 if rows > 1 else 0.2)
        colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, panel in enumerate(panels):
            ax = fig.add_subplot(rows, cols, i + 1)
            for r, run in enumerate(runs):
                for j, key in enumerate(panel.keys):
                    xs, ys = series(run, key, panel.x)
                    if not xs:
                        continue
                    ax.plot(xs, ys, color=colours[r % len(colours)], linestyle=LINESTYLES[j % len(LINESTYLES)],
                            marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.4,
                            label=_label(run, key, len(runs), len(panel.keys)))
            if panel.logy and all(y > 0 for r in runs for k in panel.keys for y in series(r, k, panel.x)[1]):
                ax.set_yscale("log")
            ax.set_title(panel.title)
            ax.set_xlabel("samples seen" if panel.x == "samples" else "step")
            ax.xaxis.set_major_locator(MaxNLocator(7))
            if panel.x == "samples":
                ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 150k, not 150000 (tick labels collide)
            ax.set_ylabel(panel.ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
