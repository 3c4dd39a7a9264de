"""Write the benchmark workload of ``vlmtrain bench --compare hf-trainer`` (docs/benchmarks.md), offline.

    python scripts/make_vln_workload.py --out bench/vln
    vlmtrain bench --compare hf-trainer --config bench/vln/lora.yaml --heldout bench/vln/data/heldout.json

A random 5.7 M-parameter Qwen2.5-VL, LLaVA-style JSON of 1574 navigation decisions from 60 GridNav
episodes (112 px PNG frames, up to 8 history frames + the current one per decision) and two configs:
lora.yaml (LoRA r8 on the LLM, vision frozen) and full.yaml (every parameter trains).
"""

from __future__ import annotations

import argparse
import sys

from vlmtrain.tools.workload import write_vln_workload


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the workload."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--episodes", type=int, default=60, help="training episodes (default 60: 1574 decisions)")
    p.add_argument("--heldout-episodes", type=int, default=8, help="held-out episodes (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and the random weights")
    args = p.parse_args(argv)
    w = write_vln_workload(args.out, episodes=args.episodes, seed=args.seed, heldout_episodes=args.heldout_episodes)
    print(f"wrote {w.samples} samples ({w.frames} frames) and a random Qwen2.5-VL to {w.root}; "
          f"configs {w.root / 'lora.yaml'} and {w.root / 'full.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
