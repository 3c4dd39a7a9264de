"""``vlmtrain bench --startup``: what start-up costs at the scale of a real navigation mix.

For each requested size, an InternData-N1-layout scene set of that many decision samples is written
once (``tools/scale_data.py``: real parquets and metadata, tiny shared frame files), then two fresh
processes start the config's run on it, one after the other:

- **cold**: an empty index folder, so the sample index is built (``data/index.py``);
- **warm**: the same folder again, so the index is only opened (and the step plan read from its cache).

Each process reports, from inside: seconds to build or open the data and plan the steps, its resident
memory (``/proc/self/statm``, file-backed pages of the mapped index included) before the data and
after the plan, per planned sample, and the latency of the first training step (loader start, step
0's batches, forward, backward, optimizer). The parent adds each process's whole wall time, from
``exec`` to exit, so interpreter and library imports count too.

A config whose model is the composed one (the default) is benchmarked with a tiny Qwen2.5-VL written
next to the data, since the composed model trains its tokenizer on the text of every sample (a
toy-scale path by design; ``data.max_length`` is then raised to 512 so 9-frame samples fit); any HF
family config is used as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vlmtrain.config import RunConfig, save_config

SCALE_FORMAT = "lerobot_vln"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe(cfg: RunConfig) -> dict:
    """Start ``cfg``'s run in this process up to and including its first step; the figures above."""
    t0 = time.perf_counter()
    import torch

    from vlmtrain.data.dataset import load_data, open_indexes
    from vlmtrain.data.errors import ErrorPolicy
    from vlmtrain.data.index import default_index_root
    from vlmtrain.features.source import FeatureSource
    from vlmtrain.tools.bench import run_steps
    from vlmtrain.train.build import build_model, build_plan, run_tokenizer

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, run_tokenizer(cfg, out, False))
    t_model, rss0 = time.perf_counter(), _rss()
    indexes = open_indexes(cfg.data, model, default_index_root(cfg.data.index_dir))
    t_index = time.perf_counter()
    data = load_data(cfg.data, model, cfg.seed, indexes, ErrorPolicy(cfg.data.on_error))
    t_data = time.perf_counter()
    plan = build_plan(cfg, data, model, cached=False)
    t_plan, rss1 = time.perf_counter(), _rss()
    n = len(data.samples)
    run_steps(cfg, data, model, FeatureSource(), torch.device("cpu"), warmup=0, steps=1)
    t_step = time.perf_counter()
    return {"samples": n, "frames": int(data.frames.shape[0]), "steps_per_epoch": plan.steps_per_epoch,
            "imports_and_model_s": round(t_model - t0, 3), "index_s": round(t_index - t_model, 3),
            "mix_s": round(t_data - t_index, 3), "plan_s": round(t_plan - t_data, 3),
            "start_s": round(t_plan - t_model, 3), "first_step_s": round(t_step - t_plan, 3),
            "rss_before_data_mib": round(rss0 / 2**20, 1), "rss_after_plan_mib": round(rss1 / 2**20, 1),
            "rss_bytes_per_sample": round((rss1 - rss0) / max(n, 1), 1)}


def _child(cfg_path: Path, index_dir: Path) -> dict:
    """Run :func:`probe` in a fresh process; its record plus the process's wall seconds."""
    env = {**os.environ, "VLMTRAIN_INDEX_DIR": str(index_dir), "HF_HUB_OFFLINE": "1", "VLMTRAIN_LOG": "WARNING"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlmtrain.tools.startup", str(cfg_path)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"startup probe failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["process_wall_s"] = round(wall, 3)
    return record


def startup_bench(cfg: RunConfig, sizes: list[int], workdir: Path) -> dict:
    """Cold and warm start-up of ``cfg`` on scale data of each of ``sizes`` samples (written under
    ``workdir`` once and reused); the record is also written to ``workdir/startup.json``."""
    from vlmtrain.tools.scale_data import write_scale_scenes

    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.model.family == "composed":
        from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl

        tiny = workdir / "tiny-qwen2_5_vl"
        if not (tiny / "config.json").is_file():
            save_tiny_qwen_vl(tiny, family="qwen2_5_vl", seed=0)
        cfg.model.family, cfg.model.path, cfg.model.frame_size = "qwen2_5_vl", str(tiny), 32
        cfg.model.lora = True
        cfg.data.max_length = max(cfg.data.max_length, 512)  # 9 frames of 16 tokens + the prompt
    rows = []
    for n in sizes:
        data = workdir / f"scenes-{n}"
        t0 = time.perf_counter()
        written = None if data.exists() else write_scale_scenes(data, n, workers=max(1, cfg.data.load_workers))
        write_s = time.perf_counter() - t0
        cfg.data.sources, cfg.data.root, cfg.data.format = [], str(data), SCALE_FORMAT
        cfg.data.gridnav_episodes, cfg.data.index_dir = 0, ""
        cfg.output_dir = str(workdir / f"run-{n}")
        cfg_path = workdir / f"config-{n}.yaml"
        save_config(cfg, cfg_path)
        index_dir = workdir / f"index-{n}"
        shutil.rmtree(index_dir, ignore_errors=True)
        cold = _child(cfg_path, index_dir)
        warm = _child(cfg_path, index_dir)
        row = {"requested": n, "samples": cold["samples"], "cold": cold, "warm": warm,
               "cold_samples_per_s": round(cold["samples"] / max(cold["index_s"], 1e-9)),
               "index_disk_mib": round(sum(f.stat().st_size for f in index_dir.rglob("*") if f.is_file()) / 2**20, 1)}
        if written is not None:
            row["scene_set"] = {**written, "write_s": round(write_s, 1)}
        rows.append(row)
        print(format_row(row), file=sys.stderr, flush=True)
    record = {"family": cfg.model.family, "format": SCALE_FORMAT, "load_workers": cfg.data.load_workers,
              "loader_workers": cfg.data.workers, "rows": rows}
    (workdir / "startup.json").write_text(json.dumps(record, indent=1))
    return record


def format_row(row: dict) -> str:
    """One line of the start-up table."""
    c, w = row["cold"], row["warm"]
    return (f"{row['samples']:>9,} samples | cold: index {c['index_s']:.2f} s ({row['cold_samples_per_s']:,}/s), "
            f"start {c['start_s']:.2f} s, process {c['process_wall_s']:.1f} s | warm: start {w['start_s']:.2f} s, "
            f"process {w['process_wall_s']:.1f} s, {w['rss_bytes_per_sample']:.0f} B/sample RSS, "
            f"first step {w['first_step_s']:.2f} s | index {row['index_disk_mib']} MiB")


if __name__ == "__main__":  # the probe process: python -m vlmtrain.tools.startup CONFIG.yaml
    from vlmtrain.config import load_config

    print(json.dumps(probe(load_config(yaml_path=sys.argv[1]))))
