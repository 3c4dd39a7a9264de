"""``vlmtrain compare``: a comparison users wrote by hand (configs/compare/v2.yaml vs v3.yaml), run
directories of real tiny runs, the HTML page, JSON, and one-line errors for bad inputs.

Expected numbers are written by hand (acceptance) or read from the run's own files by the test
(measured timings change from run to run), never taken from the code under test."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vlmtrain.cli import main
from vlmtrain.tools.compare import setting_group

ROOT = Path(__file__).resolve().parents[2]
V2, V3 = str(ROOT / "configs/compare/v2.yaml"), str(ROOT / "configs/compare/v3.yaml")
LORA_TARGETS = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, fc1, fc2]"


def _compare(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["compare", *args]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _section(out: str, start: str, end: str) -> str:
    return out[out.index(start):out.index(end)]


def test_v2_vs_v3_acceptance(capsys):
    out = _compare(capsys, V2, V3, "--gpus", "4", "--s-per-it", "3.5,6.11")
    derived = _section(out, "## Derived", "Not comparable:")
    assert "| quantity | v2 | v3 |" in derived
    assert "| ranks (GPUs) | 4 | 4 |" in derived
    assert "| per-device micro-batch | 8 | 12 |" in derived  # 128 / (4 x 4), 144 / (4 x 3)
    assert "| gradient accumulation | 4 | 3 |" in derived
    assert "| global batch (samples per step) | 128 | 144 |" in derived
    assert "| steps | 11,620 | 20,402 |" in derived
    assert "| warmup steps | 349 | 613 |" in derived  # ceil(0.03 x 11620 = 348.6), ceil(0.03 x 20402 = 612.06)
    assert "| s/it | 3.5 (given) | 6.11 (given) |" in derived
    # 11,620 x 3.5 s = 40,670 s = 11.30 h; 20,402 x 6.11 s = 124,656.22 s = 34.63 h
    assert "| total time (steps x s/it) | 11.3 h (40,670 s) | 34.6 h (124,656 s) |" in derived
    assert "trainable share" not in derived  # LoRA on an HF model: unknown without building it
    why = "FileNotFoundError: model.path=models/Qwen2.5-VL-3B-Instruct: not a directory"
    plan_row = next(line for line in derived.splitlines() if line.startswith("| plan |"))
    assert plan_row.count(f"— ({why}") == 2  # the plan cannot run here, and says why, in both columns

    differ = _section(out, "## Settings that differ", "## Derived")
    rows = [line for line in differ.splitlines() if line.startswith("|")]
    assert rows[:2] == ["| setting | v2 | v3 |", "|---|---|---|"]
    expected = [
        "| **data** |  |  |",
        "| data.sources | r2r_125cm_0_30, rxr_125cm_0_30 | r2r_125cm_0_30, rxr_125cm_0_30, scalevln_125cm_0_30%50 |",
        "| data.sources[scalevln_125cm_0_30] | — | internvla_n1 at data/InternData-N1/vln_n1/traj_data/scalevln |",
        "| **loader** |  |  |",
        "| data.prefetch_factor | 0 | 2 |",
        "| data.persistent_workers | false | true |",
        "| **batch** |  |  |",
        "| train.batch_size | 128 | 144 |",
        "| train.grad_accum | 4 | 3 |",
        "| **training** |  |  |",
        "| train.steps | 11620 | 20402 |",
        "| **other** |  |  |",
        "| output_dir | runs/compare_v2 | runs/compare_v3 |",
    ]
    assert rows[2:] == expected  # equal lr / warmup / wd / clip / LoRA / workers are not listed

    warnings = out[out.index("Not comparable:"):].splitlines()
    assert warnings == [
        "Not comparable:",
        "- different data sources (data.sources): v2 = r2r_125cm_0_30, rxr_125cm_0_30; "
        "v3 = r2r_125cm_0_30, rxr_125cm_0_30, scalevln_125cm_0_30%50",
        "- different global batch (train.batch_size): v2 = 128; v3 = 144",
    ]


def test_v2_vs_v3_all_lists_the_equal_settings(capsys):
    out = _compare(capsys, V2, V3, "--gpus", "4", "--s-per-it", "3.5,6.11", "--all")
    table = _section(out, "## All settings", "## Derived")
    for line in ("| optim.lr | 0.0002 | 0.0002 |", "| optim.warmup_ratio | 0.03 | 0.03 |",
                 "| optim.min_lr_ratio | 0 | 0 |", "| optim.weight_decay | 0.01 | 0.01 |",
                 "| optim.grad_clip | 1 | 1 |", "| model.lora | true | true |", "| model.lora_rank | 32 | 32 |",
                 "| model.lora_alpha | 64 | 64 |", "| model.lora_dropout | 0.05 | 0.05 |",
                 f"| model.lora_targets | {LORA_TARGETS} | {LORA_TARGETS} |", "| data.workers | 16 | 16 |",
                 "| train.precision | bf16 | bf16 |", "| model.family | qwen2_5_vl | qwen2_5_vl |",
                 "| ≠ train.batch_size | 128 | 144 |", "| ≠ data.persistent_workers | false | true |"):
        assert line in table, line
    lines = table.splitlines()
    # LoRA keys sit under their own heading, loader keys under theirs
    assert lines.index("| **LoRA** |  |  |") < lines.index("| model.lora_rank | 32 | 32 |") < lines.index("| **data** |  |  |")
    assert lines.index("| **loader** |  |  |") < lines.index("| data.workers | 16 | 16 |") < lines.index("| **batch** |  |  |")


def test_v2_vs_v3_json(capsys):
    record = json.loads(_compare(capsys, V2, V3, "--gpus", "4", "--s-per-it", "3.5,6.11", "--json"))
    derived = {r["name"]: r["values"] for r in record["derived"]}
    assert derived["per-device micro-batch"] == [8.0, 12.0]
    assert derived["total time (steps x s/it)"] == pytest.approx([40670.0, 124656.22])
    assert [c["ranks"] for c in record["columns"]] == [4, 4]
    assert {s["key"] for s in record["settings"] if s["differs"]} == {
        "data.sources", "data.sources[scalevln_125cm_0_30]", "data.prefetch_factor", "data.persistent_workers",
        "train.batch_size", "train.grad_accum", "train.steps", "output_dir"}
    assert len(record["not_comparable"]) == 2


def test_flags_model_precision_history_and_image_size(capsys, tmp_path):
    text = Path(V2).read_text()
    other = tmp_path / "v2b.yaml"
    other.write_text(text.replace("Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-7B-Instruct")
                     .replace("precision: bf16", "precision: fp32").replace("num_history: 8", "num_history: 4")
                     .replace("  lora: true", "  lora: true\n  frame_size: 224"))
    out = _compare(capsys, V2, str(other))
    warnings = out[out.index("Not comparable:"):].splitlines()[1:]
    assert warnings == [
        "- different model (model.path): v2 = models/Qwen2.5-VL-3B-Instruct; v2b = models/Qwen2.5-VL-7B-Instruct",
        "- different precision (train.precision): v2 = bf16; v2b = fp32",
        "- different history frames (data.num_history): v2 = 8; v2b = 4",
        "- different image size (model.frame_size): v2 = the adapter's default; v2b = 224",
    ]
    assert "| per-device micro-batch | 32 | 32 |" in out  # --gpus defaults to 1: 128 / (1 x 4)
    assert "total time" not in out  # no s/it known


def test_same_config_twice_is_comparable(capsys):
    out = _compare(capsys, V2, V2)
    assert "Not comparable" not in out
    assert "None: every setting is equal (`--all` lists them)." in out


def test_setting_groups():
    assert [setting_group(k) for k in ("model.lora", "model.lora_targets", "model.path", "data.load_workers",
                                       "data.prefetch_factor", "data.num_history", "train.grad_accum",
                                       "train.steps", "optim.lr", "parallel.backend", "memory.alloc_conf",
                                       "features.cache", "seed")] == [
        "LoRA", "LoRA", "model", "loader", "loader", "data", "batch", "training", "optimizer", "parallel",
        "memory", "other", "other"]


# ---- run directories of real tiny runs --------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(gridnav_root, tmp_path_factory):
    """Two 20-step gridnav_tiny runs: batch 16 (run a) and batch 24 (run b), logged every 5 steps."""
    base = tmp_path_factory.mktemp("compare")
    for name, batch in (("a", 16), ("b", 24)):
        assert main(["train", "--preset", "gridnav_tiny", f"output_dir={base / name}", f"data.root={gridnav_root}",
                     "data.gridnav_episodes=0", "train.progress=false", f"train.batch_size={batch}"]) == 0
    return base / "a", base / "b"


def _metrics(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _three_sig(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def test_run_directories_show_measured_speed_and_loss_at_equal_samples(capsys, two_runs):
    a, b = two_runs
    out = _compare(capsys, str(a), str(b))
    ma, mb = _metrics(a), _metrics(b)
    assert sorted(ma) == sorted(mb) == [5, 10, 15, 20]
    s_a = sum(m["time/step_s"] for m in ma.values()) / 4
    s_b = sum(m["time/step_s"] for m in mb.values()) / 4
    measured = out[out.index("## Measured"):]
    assert f"| s/it (mean time/step_s) | {s_a:.3g} | {s_b:.3g} |" in measured
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert f"| samples/s (samples / wall time) | {_three_sig(sa['samples_per_s'])} | " \
           f"{_three_sig(sb['samples_per_s'])} |" in measured
    # a reaches 20 x 16 = 320 samples, b 20 x 24 = 480: both at 320. a: its step 20; b: between its
    # steps 10 (240 samples) and 15 (360 samples), 80/120 of the way.
    loss_a = ma[20]["loss/train"]
    loss_b = mb[10]["loss/train"] + 2 / 3 * (mb[15]["loss/train"] - mb[10]["loss/train"])
    assert f"| loss at 320 samples seen | {loss_a:.4f} | {loss_b:.4f} |" in measured
    assert "| steps trained | 20 | 20 |" in measured
    assert "Columns: a = " in out and "(run, 1 GPU, ranks from summary.json)" in out
    assert "| s/it | " in out and "(measured)" in out
    assert "| train.batch_size | 16 | 24 |" in out
    assert out.rstrip().endswith("- different global batch (train.batch_size): a = 16; b = 24")
    assert "| trainable share | 100 % | 100 % |" in out  # composed, nothing frozen

    record = json.loads(_compare(capsys, str(a), str(b), "--json"))
    rows = {r["name"]: r["values"] for r in record["measured"]}
    assert rows["loss at 320 samples seen"] == pytest.approx([loss_a, loss_b])
    assert rows["s/it (mean time/step_s)"] == pytest.approx([s_a, s_b])


class _Tables(HTMLParser):
    """Each <table> as rows of cell texts; every <title>, <li> text; whether any tag loads something."""

    def __init__(self):
        super().__init__()
        self.tables, self.items, self.title, self.loads = [], [], "", []
        self._cell = self._tag = None

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        self.loads += [(tag, k) for k, v in attrs if k in ("src", "href")] + ([tag] if tag in ("script", "link") else [])
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "li":
            self.items.append("")

    def handle_endtag(self, tag):
        self._tag = None
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._tag == "li":
            self.items[-1] += data
        elif self._tag == "title":
            self.title += data


def test_html_page_has_the_same_numbers(capsys, two_runs, tmp_path):
    a, b = two_runs
    config = tmp_path / "c.yaml"  # a config column too, with a value that needs escaping
    config.write_text((a / "config.yaml").read_text().replace(f"output_dir: {a}", "output_dir: runs/<b>&x"))
    page = tmp_path / "out" / "compare.html"
    page.parent.mkdir()
    out = _compare(capsys, str(a), str(b), str(config), "--html", str(page), "--s-per-it", ",,2.5")
    parser = _Tables()
    parser.feed(page.read_text())
    assert parser.title == "vlmtrain compare: a vs b vs c"
    assert parser.loads == []  # self-contained: no script, stylesheet link or remote resource
    settings, derived, measured = parser.tables
    assert ["output_dir", str(a), str(b), "runs/<b>&x"] in settings
    assert settings[0] == ["setting", "a", "b", "c"]
    assert ["batch"] in settings  # a group heading row
    ma, mb = _metrics(a), _metrics(b)
    s_a = sum(m["time/step_s"] for m in ma.values()) / 4
    s_b = sum(m["time/step_s"] for m in mb.values()) / 4
    assert ["s/it (mean time/step_s)", f"{s_a:.3g}", f"{s_b:.3g}", "—"] in measured
    loss_b = mb[10]["loss/train"] + 2 / 3 * (mb[15]["loss/train"] - mb[10]["loss/train"])
    assert ["loss at 320 samples seen", f"{ma[20]['loss/train']:.4f}", f"{loss_b:.4f}", "—"] in measured
    # c: 20 steps x 2.5 s (given) = 50 s
    assert ["total time (steps x s/it)"] == [r[0] for r in derived if r[0].startswith("total")]
    total = next(r for r in derived if r[0].startswith("total"))
    assert total[3] == "0.014 h (50 s)"
    assert "different global batch (train.batch_size): a = 16; b = 24; c = 16" in parser.items
    # the Markdown on stdout has the same cells
    assert f"| s/it (mean time/step_s) | {s_a:.3g} | {s_b:.3g} | — |" in out
    assert "| output_dir | " + str(a) + " | " + str(b) + " | runs/<b>&x |" in out


# ---- bad inputs: one line on stderr, exit 2 ---------------------------------------------------------


@pytest.mark.parametrize("case, args, says", [
    ("missing path", ["nope.yaml", V2], "nope.yaml: no such config file or run directory"),
    ("directory without config.yaml", ["{tmp}", V2], "not a run directory (no config.yaml"),
    ("YAML syntax error", ["{tmp}/broken.yaml", V2], "broken.yaml: not a YAML config"),
    ("unknown key", ["{tmp}/typo.yaml", V2], "config error: {tmp}/typo.yaml: unknown config key 'optim.lrr' "
                                            "(did you mean 'optim.lr'?)"),
    ("invalid value", ["{tmp}/bad.yaml", V2], "config error: {tmp}/bad.yaml: train.batch_size=10 is not a multiple"),
    ("too few --s-per-it", [V2, V3, "--s-per-it", "3.5"], "--s-per-it 3.5: 1 value(s) for 2 columns"),
    ("not a number", [V2, V3, "--s-per-it", "3.5,fast"], "'fast' is not a number of seconds"),
    ("one column", [V2], "compare needs at least two configs or run directories, got 1"),
    ("no GPUs", [V2, V3, "--gpus", "0"], "--gpus 0: must be > 0"),
    ("unknown GPU kind", [V2, V3, "--gpu", "v100"], "--gpu v100: unknown; choose from h100"),
    ("MFU above 1", [V2, V3, "--mfu", "1.5"], "--mfu 1.5: must be in (0, 1]"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, case, args, says):
    (tmp_path / "broken.yaml").write_text("train: [steps: 10\n")
    (tmp_path / "typo.yaml").write_text("optim:\n  lrr: 1.0e-3\n")
    (tmp_path / "bad.yaml").write_text("train:\n  batch_size: 10\n  grad_accum: 3\n")
    capsys.readouterr()
    assert main(["compare", *[a.format(tmp=tmp_path) for a in args]]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmtrain: "), captured.err
    assert says.format(tmp=tmp_path) in lines[0]


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    for option in ("--gpus", "--s-per-it", "--no-plan", "--gpu", "--mfu", "--all", "--html", "--json",
                   "Not comparable"):
        assert option in text


def test_docs_example_is_the_real_output(capsys, monkeypatch):
    """docs/tools.md shows the acceptance comparison as the command prints it."""
    monkeypatch.chdir(ROOT)
    out = _compare(capsys, "configs/compare/v2.yaml", "configs/compare/v3.yaml", "--gpus", "4", "--s-per-it", "3.5,6.11")
    doc = (ROOT / "docs" / "tools.md").read_text()
    section = doc[doc.index("## vlmtrain compare"):]
    block = section[section.index("```markdown\n") + len("```markdown\n"):]
    assert block[:block.index("```\n")] == out


# ---- config columns planned: what `vlmtrain plan` predicts -------------------------------------------


def test_config_columns_show_the_plans_prediction(capsys, tiny_cfg, tmp_path, qwen_lora_cfg, gridnav_root):
    """A composed and a Qwen2.5-VL LoRA config on real (tiny) data are planned; each predicted row is
    the number `vlmtrain plan --json` prints for that config alone, the trainable share is counted on
    the model training builds, and a config whose data is missing says why in its column."""
    from vlmtrain.config import save_config
    from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
    from vlmtrain.train.build import build_model_and_data

    tiny_cfg.features.cache = "off"
    qwen = qwen_lora_cfg(save_tiny_qwen_vl(tmp_path / "qwen", family="qwen2_5_vl", seed=0), gridnav_root,
                         tmp_path / "qwen_run")
    qwen.train.steps = 7
    qwen.features.cache = "off"
    missing = qwen_lora_cfg(tmp_path / "qwen", tmp_path / "no_such_data", tmp_path / "missing_run")
    paths = []
    for name, cfg in (("composed", tiny_cfg), ("qwen", qwen), ("missing", missing)):
        save_config(cfg, tmp_path / f"{name}.yaml")
        paths.append(str(tmp_path / f"{name}.yaml"))
    capsys.readouterr()
    assert main(["compare", *paths, "--json", "--mfu", "0.4", "--gpu", "h200"]) == 0
    result = json.loads(capsys.readouterr().out)
    derived = {r["name"]: r for r in result["derived"]}

    plans = []
    for path in paths[:2]:
        assert main(["plan", "--config", path, "--json", "--mfu", "0.4", "--gpu", "h200"]) == 0
        plans.append(json.loads(capsys.readouterr().out))
    for i, plan in enumerate(plans):
        assert derived["predicted s/it (plan)"]["values"][i] == plan["compute"]["step_s"]
        assert derived["predicted total time (plan)"]["values"][i] == plan["compute"]["total_s"]
        assert derived["steps per epoch (plan)"]["values"][i] == plan["batch"]["steps_per_epoch"]
        configured = next(m for m in plan["memory"].values() if m["configured"])
        assert derived["memory per rank (plan)"]["values"][i] == configured["total"]
        assert "at MFU 0.4 on h200" in derived["predicted s/it (plan)"]["text"][i]
    assert derived["steps (plan)"]["values"][:2] == [tiny_cfg.train.steps, 7]
    assert derived["predicted s/it (plan)"]["values"][2] is None

    for i, cfg in enumerate((tiny_cfg, qwen)):
        model, data = build_model_and_data(cfg, Path(cfg.output_dir))
        assert derived["samples per epoch (plan)"]["values"][i] == len(data.samples)
        params = list(model.parameters())
        share = sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)
        assert derived["trainable parameters (plan)"]["values"][i] == pytest.approx(share)
    assert derived["trainable parameters (plan)"]["values"][0] == 1.0
    assert 0 < derived["trainable parameters (plan)"]["values"][1] < 0.5  # LoRA: a small share trains

    assert derived["plan"]["text"][:2] == ["planned", "planned"]
    assert derived["plan"]["text"][2] == f"— (FileNotFoundError: data path {tmp_path / 'no_such_data'} does not exist)"
    assert any(n.startswith("composed: MFU 0.4 (--mfu)") for n in result["plan_notes"])

    capsys.readouterr()
    assert main(["compare", *paths[:2], "--no-plan"]) == 0
    assert "(plan)" not in capsys.readouterr().out
