"""The ``vlmtrain`` console script: it only parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from vlmtrain.config import ConfigError, RunConfig, load_config
from vlmtrain.presets import PRESETS, get_preset


def _train(args: argparse.Namespace) -> int:
    from vlmtrain.train.loop import train

    base = get_preset(args.preset) if args.preset else RunConfig()
    cfg = load_config(base, args.config, args.overrides)
    summary = train(cfg)
    print(json.dumps({k: summary[k] for k in ("steps", "samples", "train_wall_s", "samples_per_s",
                                              "tokens_per_s", "final_loss")}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vlmtrain.train.evaluate import evaluate_run, format_report

    report = evaluate_run(args.run_dir, episodes=args.episodes, seed=args.seed)
    print(format_report(report))
    print(f"wrote {Path(args.run_dir) / 'eval.json'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from vlmtrain.train.export_run import export_run

    if args.merged is None and args.adapter is None:
        print("vlmtrain export: give --merged OUT and/or --adapter OUT", file=sys.stderr)
        return 2
    for path in export_run(args.run_dir, merged=args.merged, adapter=args.adapter, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0


def _data_gridnav(args: argparse.Namespace) -> int:
    from vlmtrain.data.gridnav.generate import write_dataset

    t0 = time.perf_counter()
    root = write_dataset(Path(args.out), episodes=args.episodes, seed=args.seed, split=args.split,
                         image_size=args.image_size, noise_p=args.noise, detour_p=args.detour)
    info = json.loads((Path(root) / "meta" / "info.json").read_text())
    print(f"wrote {info['total_episodes']} episodes, {info['total_frames']} frames to {root} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="vlmtrain", description="Train and evaluate vision-language(-navigation) models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model", description=(
        "Train from a preset and/or a YAML config, then key=value overrides "
        "(e.g. vlmtrain train --preset gridnav output_dir=runs/x train.steps=500). Unknown keys are errors."))
    t.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset config")
    t.add_argument("--config", help="YAML config file (applied over the preset)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 train.resume=true")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="closed-loop GridNav evaluation of a run",
                       description="Roll a trained run out on held-out GridNav episodes; writes RUN_DIR/eval.json.")
    e.add_argument("run_dir", help="run directory written by `vlmtrain train`")
    e.add_argument("--episodes", type=int, help="number of held-out episodes (default: the run's eval.episodes)")
    e.add_argument("--seed", type=int, help="seed of the held-out episodes (default: the run's eval.seed)")
    e.set_defaults(func=_eval)

    x = sub.add_parser("export", help="export an HF-family run (merged HF checkpoint or PEFT adapter)",
                       description="Rebuild a run's model from RUN_DIR/config.yaml and its newest checkpoint, then "
                                   "write a merged HF checkpoint (--merged) and/or a PEFT adapter (--adapter).")
    x.add_argument("run_dir", help="run directory written by `vlmtrain train` (an HF model.family)")
    x.add_argument("--merged", metavar="OUT", help="write LoRA merged into the base weights as a plain HF model dir")
    x.add_argument("--adapter", metavar="OUT", help="write the PEFT adapter plus the fully trained modules")
    x.add_argument("--overwrite", action="store_true", help="replace non-empty output directories")
    x.set_defaults(func=_export)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    g = dsub.add_parser("gridnav", help="generate GridNav episodes in the InternData-N1 LeRobot layout")
    g.add_argument("--out", required=True, help="output dataset root")
    g.add_argument("--episodes", type=int, required=True, help="number of episodes")
    g.add_argument("--seed", type=int, default=0, help="world seed")
    g.add_argument("--split", default="train", choices=["train", "val", "test"], help="layout split (held out from each other)")
    g.add_argument("--image-size", type=int, default=64, help="frame side in pixels")
    g.add_argument("--noise", type=float, default=0.25, help="probability of a random executed action (labels stay expert)")
    g.add_argument("--detour", type=float, default=0.5,
                   help="probability that an episode first detours to a distractor (labels stay expert)")
    g.set_defaults(func=_data_gridnav)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlmtrain`` console script."""
    logging.basicConfig(level=os.environ.get("VLMTRAIN_LOG", "INFO"), format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vlmtrain: config error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"vlmtrain: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
