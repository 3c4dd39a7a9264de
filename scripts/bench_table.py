"""Print `vlmtrain bench` records (bench.json files or the JSON lines it printed) as Markdown table rows.

    python scripts/bench_table.py runs/bench_*/bench.json

One row per record: the configured run, its LM-only floor, and the naive pipeline when measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = ("| run | samples/s | step s | LM-only floor s | step / floor | padding eff. | data wait % | "
          "frames encoded / sample | images / sample | cache hit | breakdown s (data / vision / LM fwd / bwd / optim) "
          "| naive samples/s | naive frames enc. / sample | speed-up vs naive |")


def row(name: str, r: dict) -> str:
    """One Markdown row of a bench record."""
    b = r["breakdown_s"]
    parts = " / ".join(f"{b[k]:.4f}" for k in ("data", "vision", "lm_forward", "backward", "optimizer"))
    naive = r.get("naive") or {}
    hit = r.get("cache_hit_rate")
    cells = [name, f"{r['samples_per_s']:.0f}", f"{r['step_s']:.4f}", f"{r['lm_floor_step_s']:.4f}",
             f"**{r['step_over_floor']:.3f}**", f"{100 * r['padding_efficiency']:.1f} %", f"{r['data_wait_pct']:.2f}",
             f"{r['frames_encoded_per_sample']:.3f}", f"{r['images_per_sample']:.2f}",
             "–" if hit is None else f"{hit:.3f}", parts,
             f"{naive['samples_per_s']:.0f}" if naive else "–",
             f"{naive['frames_encoded_per_sample']:.2f}" if naive else "–",
             f"**{r['speedup_samples_per_s']:.2f}×**" if naive else "–"]
    return "| " + " | ".join(cells) + " |"


def main(paths: list[str]) -> None:
    """Print the header and one row per file (named by its parent directory or file stem)."""
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for p in map(Path, paths):
        text = p.read_text().strip()
        record = json.loads(text.splitlines()[-1]) if not text.startswith("{\n") else json.loads(text)
        name = p.parent.name if p.name == "bench.json" else p.stem
        print(row(name, record))


if __name__ == "__main__":
    main(sys.argv[1:])
