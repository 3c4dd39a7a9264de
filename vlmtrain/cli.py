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
from vlmtrain.data.errors import DataError
from vlmtrain.errors import CheckpointError, NonFiniteError, UsageError
from vlmtrain.presets import PRESETS, get_preset


def _train(args: argparse.Namespace) -> int:
    from vlmtrain.parallel.init import destroy, print0
    from vlmtrain.train.loop import train

    summary = train(_load(args))  # under torchrun every rank runs this (docs/distributed.md)
    keys = ("preempted_at_step", "steps") if "preempted_at_step" in summary else (
        "steps", "samples", "train_wall_s", "samples_per_s", "tokens_per_s", "final_loss")
    print0(json.dumps({k: summary[k] for k in keys}))  # a preempted run exits 0 too: resume continues it
    destroy()
    return 0


def _load(args: argparse.Namespace) -> RunConfig:
    """The config of a train / bench / cache command: preset, then YAML, then key=value overrides."""
    base = get_preset(args.preset) if args.preset else RunConfig()
    return load_config(base, args.config, args.overrides)


def _bench(args: argparse.Namespace) -> int:
    if args.startup:
        from vlmtrain.tools.startup import startup_bench

        cfg = _load(args)
        sizes = [int(float(x)) for x in args.samples.split(",")]
        record = startup_bench(cfg, sizes, Path(cfg.output_dir) / "startup")
        print(json.dumps(record))
        return 0
    if args.compare == "spatial":
        from vlmtrain.tools.bench_spatial import compare_spatial, format_spatial

        record = compare_spatial(_load(args), warmup=args.warmup, steps=args.steps or 15, repeats=args.repeats)
        print(format_spatial(record))
        print(json.dumps(record))
        return 0
    if args.compare == "hf-trainer":
        from vlmtrain.tools.bench_compare import compare_hf_trainer, format_compare

        record = compare_hf_trainer(_load(args), pairs=args.pairs, epochs=args.epochs, heldout=args.heldout)
        print(format_compare(record))
        print(json.dumps(record))
        return 0
    if args.protocol:
        from vlmtrain.tools.bench_protocol import format_protocol, run_protocol

        if args.compare or args.startup:
            raise ConfigError("--protocol measures the config as it is: it does not combine with --compare or --startup")

        record = run_protocol(_load(args), args.protocol, steps=args.steps, loss_target=args.loss_target,
                              loss_steps=args.loss_steps, results=Path(args.results))
        print(format_protocol(record))
        print(json.dumps(record))
        print(f"appended to {args.results}")
        return 1 if record["passed"] is False else 0
    from vlmtrain.tools.bench import bench

    record = bench(_load(args), warmup=args.warmup, steps=args.steps or 15, compare=args.compare,
                   warm_cache=not args.cold_cache)
    print(json.dumps(record))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from vlmtrain.tools.cache import fill_run_cache
    from vlmtrain.features.source import FeatureCacheUnavailable

    try:
        print(json.dumps(fill_run_cache(_load(args))))
    except FeatureCacheUnavailable as e:
        print(f"vlmtrain cache: {e}", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace) -> int:
    from vlmtrain.tools.plan import build_plan_report
    from vlmtrain.tools.plan_format import format_plan

    report = build_plan_report(_load(args), gpus=args.gpus, nodes=args.nodes, gpu=args.gpu, mfu=args.mfu)
    print(json.dumps(report) if args.json else format_plan(report))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vlmtrain.train.evaluate import evaluate_run, format_report

    report = evaluate_run(args.run_dir, episodes=args.episodes, seed=args.seed, which=args.model)
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


def _compare(args: argparse.Namespace) -> int:
    from vlmtrain.tools.compare import compare
    from vlmtrain.tools.compare_render import format_html, format_markdown

    result = compare(args.inputs, gpus=args.gpus, s_per_it=args.s_per_it, plan=not args.no_plan, gpu=args.gpu,
                     mfu=args.mfu)
    if args.html:
        Path(args.html).write_text(format_html(result, show_all=args.all))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_markdown(result, show_all=args.all), end="")
    return 0


def _report(args: argparse.Namespace) -> int:
    from vlmtrain.metrics.report import write_report

    print(f"wrote {write_report(args.runs, args.out)}")
    return 0


def _data_gridnav(args: argparse.Namespace) -> int:
    from vlmtrain.envs.gridnav.generate import write_dataset

    t0 = time.perf_counter()
    root = write_dataset(Path(args.out), episodes=args.episodes, seed=args.seed, split=args.split,
                         image_size=args.image_size, noise_p=args.noise, detour_p=args.detour,
                         lookdown_pitch=args.lookdown_pitch)
    info = json.loads((Path(root) / "meta" / "info.json").read_text())
    print(f"wrote {info['total_episodes']} episodes, {info['total_frames']} frames to {root} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def _config_args(parser: argparse.ArgumentParser) -> None:
    """The config arguments of train / bench / cache: a preset, a YAML file over it, key=value overrides."""
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset config")
    parser.add_argument("--config", help="YAML config file (applied over the preset)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 train.resume=true")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="vlmtrain", description="Train and evaluate vision-language(-navigation) models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model", description=(
        "Train from a preset and/or a YAML config, then key=value overrides "
        "(e.g. vlmtrain train --preset gridnav output_dir=runs/x train.steps=500). Unknown keys are errors."))
    _config_args(t)
    t.set_defaults(func=_train)

    b = sub.add_parser("bench", help="benchmark a config's training step against its LM-only floor", description=(
        "Train WARMUP + STEPS steps of a config (preset / YAML / overrides as for train) and print one JSON line: "
        "samples/s, tokens/s, TGS, MFU (when the device peak is known), padding efficiency, data wait %%, frames "
        "encoded per sample, cache hit rate, the step breakdown, and the LM-only floor (the same LM's "
        "forward+backward on the same packed tokens, image features in memory). Writes OUTPUT_DIR/bench.json."))
    _config_args(b)
    b.add_argument("--warmup", type=int, default=3, help="steps run before measuring (default 3)")
    b.add_argument("--steps", type=int, help="measured steps (default 15; --protocol internvl: 20, at least 15)")
    b.add_argument("--protocol", choices=["internvl"],
                   help="measure as the protocol fixes (internvl: 5 warm-up steps, TGS = tokens / step time / GPUs "
                        "of every measured step, mean and spread), print the hyper-parameters the result depends "
                        "on and append it to --results; exit 1 when --loss-target is missed (docs/benchmarks.md)")
    b.add_argument("--loss-target", type=float, help="--protocol: the mean training loss of the 5 steps up to "
                                                     "--loss-steps must be at most this")
    b.add_argument("--loss-steps", type=int, help="--protocol: optimizer steps after which --loss-target is checked")
    b.add_argument("--results", default="bench_results.jsonl",
                   help="--protocol: JSON-lines file the result is appended to (default bench_results.jsonl)")
    b.add_argument("--compare", choices=["naive", "hf-trainer", "spatial"],
                   help="naive: also run the same model and data padded, without de-duplication or cache; print the "
                        "ratio. hf-trainer: whole-process runs of the stock transformers.Trainer recipe and of "
                        "vlmtrain train, PAIRS interleaved pairs of EPOCHS epochs (needs vlmtrain[compare]; "
                        "docs/benchmarks.md). spatial: a model.spatial_encoder config without its spatial branch, "
                        "with it uncached (cold) and with its features cached (warm); print the step times and "
                        "their ratios")
    b.add_argument("--repeats", type=int, default=1, help="--compare spatial: run the three measurements in turn this "
                                                          "many times and report medians (default 1)")
    b.add_argument("--pairs", type=int, default=3, help="--compare hf-trainer: interleaved pairs of runs (default 3)")
    b.add_argument("--epochs", type=float, default=1.0, help="--compare hf-trainer: epochs per run (default 1)")
    b.add_argument("--heldout", help="--compare hf-trainer: LLaVA JSON of held-out samples; each final model's loss "
                                     "on them is reported")
    b.add_argument("--cold-cache", action="store_true",
                   help="do not fill the feature cache before measuring (default: fill it, as `vlmtrain cache`)")
    b.add_argument("--startup", action="store_true",
                   help="instead of steps: cold and warm start-up (sample index build / open, step plan, resident memory "
                        "per sample, first step) on InternData-N1-layout scene sets of --samples decision samples, "
                        "written once under OUTPUT_DIR/startup (docs/benchmarks.md)")
    b.add_argument("--samples", default="10000,100000,1000000",
                   help="--startup: comma-separated scene-set sizes in samples (default 10000,100000,1000000)")
    b.set_defaults(func=_bench)

    c = sub.add_parser("cache", help="precompute the frozen-encoder feature cache of a config's data", description=(
        "Encode every frame of the config's data with its frozen vision encoder (and projector, unless only the "
        "encoder is frozen) into the feature cache (features.cache_dir, default OUTPUT_DIR/feature_cache). "
        "features.cache=off is taken as on. Fails, saying why, when the encoder trains. With model.spatial_encoder "
        "the spatial encoder's features go into FEATURE_CACHE/spatial too (alone when the vision encoder trains)."))
    _config_args(c)
    c.set_defaults(func=_cache)

    e = sub.add_parser("eval", help="closed-loop GridNav evaluation of a run",
                       description="Roll a trained run out on held-out GridNav episodes; writes RUN_DIR/eval.json.")
    e.add_argument("run_dir", help="run directory written by `vlmtrain train`")
    e.add_argument("--episodes", type=int, help="number of held-out episodes (default: the run's eval.episodes)")
    e.add_argument("--seed", type=int, help="seed of the held-out episodes (default: the run's eval.seed)")
    e.add_argument("--model", choices=("auto", "best", "final"), default="auto",
                   help="which model: best (RUN_DIR/checkpoints/best, kept by train.best_metric), final (RUN_DIR/model), "
                        "or auto: best when the run kept one, else final (default)")
    e.set_defaults(func=_eval)

    pl = sub.add_parser("plan", help="predict a config's parameters, batch, FLOPs, step time and memory per rank",
                        description=(
        "Read a config's data (sample indexes, no frame decoded) and build its model without weights, then "
        "print parameters per part, samples per source, the batch arithmetic (micro-batch x accumulation x "
        "ranks), steps, FLOPs per step (the FLOPs model training logs MFU with), step / epoch / run time at "
        "a MFU (OUTPUT_DIR/bench.json's when measured on that GPU, else an assumption), and per rank and "
        "backend (ddp, fsdp2, ZeRO-2/3, offload) parameter, gradient, optimizer, buffer and activation "
        "memory with and without activation checkpointing, and whether it fits. Every assumption is printed."))
    _config_args(pl)
    pl.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes (default 1); ranks = gpus x nodes")
    pl.add_argument("--gpu", default="h100", help="GPU kind: h100, h100-pcie, h100-nvl, h200, h200-nvl, a100 "
                                                   "(80 GB), a100-40, a100-80 (default h100)")
    pl.add_argument("--mfu", type=float, help="model FLOPs utilisation for the time estimate (default: the "
                                             "bench result for this config and GPU, else 0.35, assumed)")
    pl.add_argument("--json", action="store_true", help="print the report as one JSON object")
    pl.set_defaults(func=_plan)

    x = sub.add_parser("export", help="export a run's model from its newest checkpoint (final model dir or PEFT adapter)",
                       description="Rebuild a run's model from RUN_DIR/config.yaml and its newest checkpoint, then "
                                   "write its final model directory (--merged; an HF family: a plain HF checkpoint "
                                   "with LoRA merged) and/or a PEFT adapter (--adapter, LoRA runs).")
    x.add_argument("run_dir", help="run directory written by `vlmtrain train`")
    x.add_argument("--merged", metavar="OUT", help="write the model as `vlmtrain eval` and transformers load it "
                                                   "(LoRA merged into the base weights)")
    x.add_argument("--adapter", metavar="OUT", help="write the PEFT adapter plus the fully trained modules (LoRA runs)")
    x.add_argument("--overwrite", action="store_true", help="replace non-empty output directories")
    x.set_defaults(func=_export)

    k = sub.add_parser(
        "compare", help="compare configs and runs side by side (settings, batch sizes, planned and measured time)",
        description=(
        "Compare YAML configs and/or run directories written by `vlmtrain train`, one column each. Prints Markdown: the settings that differ, grouped (model, LoRA, data, loader, batch, "
        "optimizer, training, parallel, memory, other; --all: every setting); derived quantities (ranks, "
        "per-device micro-batch = train.batch_size / (ranks x grad_accum), global batch, steps, warmup steps, "
        "total time = steps x s/it; for each config column what `vlmtrain plan` predicts, from its data's sample "
        "indexes and its model built without weights: samples and steps per epoch, trainable parameters, s/it and "
        "total time at a MFU, memory per rank, with the plan's assumptions; --no-plan skips it); for run directories what they measured (s/it, samples/s, tokens/s, TGS, "
        "MFU and peak memory when logged, loss at equal samples seen, best validation metric, wall time); and "
        "'Not comparable:' warnings for a different model, data sources, global batch, precision, history "
        "frames or image size (exit status still 0)."))
    k.add_argument("inputs", nargs="+", metavar="CONFIG_OR_RUN", help="two or more YAML configs or run directories")
    k.add_argument("--gpus", type=int, default=1, help="ranks (GPUs) of the config columns (default 1; run "
                                                       "directories use their summary's world_size)")
    k.add_argument("--s-per-it", metavar="S1,S2,...", help="seconds per optimizer step, one value per column (empty "
                                                           "for none, e.g. 3.5,), e.g. read off a real run's log; "
                                                           "gives the total time (run directories: their mean "
                                                           "time/step_s when empty)")
    k.add_argument("--no-plan", action="store_true", help="do not run `vlmtrain plan` on the config columns (by "
                                                          "default each is planned for its predicted s/it, total "
                                                          "time and memory per rank; one whose model or data is "
                                                          "not here says why)")
    k.add_argument("--gpu", default="h100", help="GPU kind the config columns are planned for (as `plan --gpu`; "
                                                 "default h100)")
    k.add_argument("--mfu", type=float, help="MFU of the planned time (as `plan --mfu`; default: a matching bench "
                                             "result, else 0.35, assumed)")
    k.add_argument("--all", action="store_true", help="list every setting, the equal ones too")
    k.add_argument("--html", metavar="OUT", help="also write the tables as one self-contained HTML page")
    k.add_argument("--json", action="store_true", help="print the comparison as JSON instead of Markdown")
    k.set_defaults(func=_compare)

    r = sub.add_parser("report", help="write a self-contained HTML report of one or more runs (plots inline)",
                       description="Plot one run, or several overlaid, into one HTML page that opens without network: "
                                   "loss against steps and samples seen, learning rate, throughput, MFU, step time, "
                                   "data wait, memory per rank, rank balance, cache hit rate, frames per sample, "
                                   "eval metrics, the data mixture, the summary and the config. A run still training "
                                   "is reported as far as it got (docs/tools.md).")
    r.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by `vlmtrain train`")
    r.add_argument("--out", metavar="FILE", help="the HTML file (default RUN/report.html; required for several runs)")
    r.set_defaults(func=_report)

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
    g.add_argument("--lookdown-pitch", type=float, default=0.0,
                   help="also write InternData-N1's look-down setting at this pitch (e.g. 30: 125cm_30deg frames and "
                        "pixel goals, read by an internvla_n1 source named gridnav_125cm_0_30); 0: none")
    g.set_defaults(func=_data_gridnav)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlmtrain`` console script."""
    # Under torchrun only rank 0 logs below warnings (N ranks would print every line N times).
    level = os.environ.get("VLMTRAIN_LOG", "INFO") if os.environ.get("RANK", "0") == "0" else "WARNING"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vlmtrain: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # names the annotation file, the record and the reason
        print(f"vlmtrain: data error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"vlmtrain: checkpoint error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:  # a bad command-line input that is not a config key
        print(f"vlmtrain: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # names the step and its samples; a training failure, not a bad input
        print(f"vlmtrain: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyError as e:
        print(f"vlmtrain: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # a missing run, model or data directory: the message says which
        print(f"vlmtrain: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
