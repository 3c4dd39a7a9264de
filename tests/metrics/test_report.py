"""``vlmtrain report`` on real tiny runs: every section, overlays, a run in progress, errors, and the
page in a real headless browser (Debian's chromium; skipped when it is not installed)."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vlmtrain.cli import main
from vlmtrain.metrics.report import write_report, write_run_report
from vlmtrain.metrics.report_data import load_run, samples_seen

pytestmark = pytest.mark.usefixtures("one_thread")

SECTIONS = ("runs", "loss", "lr", "throughput", "mfu", "step-time", "data-wait", "memory", "balance", "cache",
            "frames", "eval", "mixture", "summary", "config")
# What a CPU GridNav run logs: everything but MFU (no device peak), memory (CUDA only) and the cache.
PLOTTED = ("loss", "lr", "throughput", "step-time", "data-wait", "balance", "frames", "eval")
NOT_LOGGED = ("mfu", "memory", "cache")


@pytest.fixture(scope="module")
def tiny_run(gridnav_root, tmp_path_factory) -> Path:
    """A real 20-step gridnav_tiny run with held-out validation and rollouts every 10 steps."""
    out = tmp_path_factory.mktemp("report") / "tiny"
    assert main(["train", "--preset", "gridnav_tiny", f"data.root={gridnav_root}", "data.gridnav_episodes=0",
                 f"output_dir={out}", "train.progress=false", "data.val_fraction=0.25", "eval.every=10",
                 "eval.rollout_episodes=4"]) == 0
    return out


def _sections(page: str) -> dict[str, str]:
    """Each <section id=...>'s inner HTML."""
    return dict(re.findall(r'<section id="([^"]+)"[^>]*>(.*?)</section>', page, flags=re.S))


def _svgs(fragment: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', fragment)]


def _texts(svg: bytes) -> str:
    """The strings drawn in a matplotlib SVG (it writes each text as glyph paths after a comment)."""
    return " ".join(m.decode() for m in re.findall(rb"<!-- (.*?) -->", svg, flags=re.S))


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "model", "tokenizer", "feature_cache"))
    return dest


def test_train_writes_a_report_with_every_section(tiny_run):
    page = (tiny_run / "report.html").read_text()  # written by `vlmtrain train` itself
    sections = _sections(page)
    assert list(sections) == list(SECTIONS)
    for name in PLOTTED:  # one drawn plot per group with data, each a valid SVG of non-zero size
        (svg,) = _svgs(sections[name])
        root = ET.fromstring(svg)
        assert float(root.get("width").rstrip("pt")) > 0 and float(root.get("height").rstrip("pt")) > 0
        assert root.findall(".//{http://www.w3.org/2000/svg}path"), name
    for name in NOT_LOGGED:
        assert not _svgs(sections[name]) and "not logged" in sections[name]
    assert "CUDA runs only" in sections["memory"]
    assert page.count('<img class="plot"') == len(PLOTTED)
    loss = _texts(_svgs(sections["loss"])[0])
    assert "loss/train" in loss and "val/loss" in loss and "samples seen" in loss
    evals = _texts(_svgs(sections["eval"])[0])
    for key in ("eval/sr", "eval/spl", "val/accuracy", "val/loss"):
        assert key in evals
    summary = json.loads((tiny_run / "summary.json").read_text())
    for value in (summary["samples"], f"{summary['final_loss']:.6g}", summary["train_wall_s"]):
        assert str(value) in sections["summary"]
    assert "train" in sections["mixture"] and str(summary["data"]["sources"]["train"]["planned"]) in sections["mixture"]
    config = (tiny_run / "config.yaml").read_text()
    assert html.escape(config) in sections["config"] and "{history} now:" in config
    assert "finished" in sections["runs"] and 'data-in-progress' not in page


def test_page_is_self_contained(tiny_run):
    page = (tiny_run / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # only inline images and in-page links
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page  # the browser itself refuses any fetch


def test_samples_seen_counts_every_trained_sample(tiny_run):
    run = load_run(tiny_run)
    seen = samples_seen(run)
    assert seen == sorted(seen) and seen[0] > 0
    assert seen[-1] == pytest.approx(json.loads((tiny_run / "summary.json").read_text())["samples"], rel=0.01)


def test_config_is_escaped(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "evil")
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "note: '</pre><script>alert(1)</script>'\n")
    page = write_report([run]).read_text()
    assert "<script>alert(1)" not in page and "&lt;/pre&gt;&lt;script&gt;alert(1)" in page


def test_two_runs_overlaid_with_a_legend_naming_both(tiny_run, tmp_path):
    other = _copy(tiny_run, tmp_path / "second")
    out = tmp_path / "both.html"
    assert main(["report", str(tiny_run), str(other), "--out", str(out)]) == 0
    sections = _sections(out.read_text())
    for name in ("loss", "throughput", "eval"):
        legend = _texts(_svgs(sections[name])[0])
        assert "tiny" in legend and "second" in legend, name
    assert "<th>tiny</th><th>second</th>" in sections["summary"]


def test_a_run_in_progress_is_reported_and_marked(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "live")
    (run / "summary.json").unlink()
    (run / "report.html").unlink()
    text = (run / "metrics.jsonl").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    (run / "metrics.jsonl").write_text(text[: len(text) - len(last) // 2 - 1])  # the writer caught mid-line
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    sections = _sections(page)
    assert 'data-in-progress="1"' in page and "in progress (last logged step" in sections["runs"]
    assert "last metrics line incomplete" in sections["runs"]
    assert "no summary.json yet" in sections["summary"]
    assert page.count('<img class="plot"') == len(PLOTTED)


def test_memory_per_rank_is_plotted_when_logged(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "cuda_like")  # the keys a 2-rank CUDA run logs, added to a real run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row.update({"memory/peak_allocated_gib_max": 1.0 + i, "memory/peak_allocated_gib_min": 0.5 + i,
                    "memory/peak_reserved_gib_max": 2.0 + i, "memory/peak_reserved_gib_min": 1.5 + i})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    memory = _sections(write_report([run]).read_text())["memory"]
    (svg,) = _svgs(memory)
    drawn = _texts(svg)
    assert "not logged" not in memory
    for key in ("peak_allocated_gib_max", "peak_allocated_gib_min", "peak_reserved_gib_max", "peak_reserved_gib_min"):
        assert f"memory/{key}" in drawn


@pytest.mark.parametrize("case", ["missing", "no_metrics", "several_without_out"])
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    argv = {"missing": [str(tmp_path / "nope")], "no_metrics": [str(tmp_path / "empty")],
            "several_without_out": [str(tiny_run), str(tiny_run)]}[case]
    assert main(["report", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmtrain: report: ") and "\n" not in err


def test_a_report_failure_is_a_warning_not_a_failed_run(tmp_path, caplog):
    assert write_run_report(tmp_path / "gone") is None
    assert "could not write" in caplog.text


# --- a real headless browser -------------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y "
                                                             "chromium; .ci/run installs it)")


def open_in_browser(page: Path, profile: Path) -> tuple[dict[str, str], list[str]]:
    """Load ``page`` in headless chromium; the <body> attributes of the DOM after the load event, and
    every console message the page produced (the report writes none when all is well)."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
        check=False, capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, f"chromium printed no DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return attrs, console


@needs_chromium
def test_the_page_loads_in_a_browser_with_every_plot_drawn(tiny_run, tmp_path):
    two = write_report([tiny_run, _copy(tiny_run, tmp_path / "second")], tmp_path / "two.html")
    for page in (tiny_run / "report.html", two):
        attrs, console = open_in_browser(page, tmp_path / "profile")
        assert console == []
        assert attrs["data-loaded"] == "1"
        assert int(attrs["data-plots"]) == int(attrs["data-plots-drawn"]) == int(attrs["data-plots-expected"])
        assert int(attrs["data-plots"]) == len(PLOTTED)


@needs_chromium
def test_the_browser_check_catches_a_broken_plot_and_a_blocked_fetch(tiny_run, tmp_path):
    page = (tiny_run / "report.html").read_text()
    broken = tmp_path / "broken.html"  # one plot's SVG cut short: the browser cannot decode it
    start = page.index("data:image/svg+xml;base64,") + len("data:image/svg+xml;base64,")
    broken.write_text(page[:start] + page[start:start + 400] + page[page.index('"', start):])
    attrs, console = open_in_browser(broken, tmp_path / "profile")
    assert int(attrs["data-plots-drawn"]) == int(attrs["data-plots"]) - 1
    assert any("plot not drawn: Loss" in line for line in console)
    external = tmp_path / "external.html"  # an external image is refused (CSP) and reported
    external.write_text(page.replace("<main>", '<main><img src="https://example.invalid/x.png">', 1))
    _, console = open_in_browser(external, tmp_path / "profile")
    assert any("Content Security Policy" in line for line in console)
