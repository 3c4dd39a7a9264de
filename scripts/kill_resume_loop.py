"""Crash-test exact resume: SIGKILL `vlmtrain train` again and again, resume each time, compare the end.

    python scripts/kill_resume_loop.py --kills 24 --chains 3 -- --preset gridnav train.steps=120 train.ckpt_every=10

Two uninterrupted reference runs measure the run-to-run spread (0 when the run is deterministic). Each
chain then starts the same run with ``train.resume=true`` and kills it with SIGKILL ``kills / chains``
times, cycling through three moments: at a random time (in the first 60 % of the faster reference's
time), while a checkpoint is being written (its ``.tmp-step-N`` directory exists) and right after a
checkpoint appeared. After the last kill the chain runs to the end; its final weights are compared with
the first reference's. A start that finishes before its kill ends its chain early (it is listed), and
further chains are added until ``--kills`` kills were made (at most ``3 * chains`` chains), so a machine
that got faster after the references were timed still gets every kill. The result is
one line per chain and a JSON summary; the exit code is 0 when every chain ends bitwise equal to the reference
(``--within-spread``: no further from it than the second reference).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

MOMENTS = ("random", "during_checkpoint", "after_checkpoint")


def _start(train_args: list[str], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vlmtrain.cli", "train", *train_args, f"output_dir={out}",
           "train.resume=true", "train.progress=false"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _checkpoints(out: Path, prefix: str) -> set[str]:
    try:
        return {e.name for e in os.scandir(out / "checkpoints") if e.name.startswith(prefix)}
    except FileNotFoundError:
        return set()


def _kill(proc: subprocess.Popen, out: Path, moment: str, rng: random.Random, run_s: float) -> str:
    """SIGKILL ``proc`` at ``moment``; returns what happened ("killed <moment>" or "finished")."""
    deadline = time.time() + max(4 * run_s, 120)
    if moment == "random":
        # In the first 60 % of an uninterrupted run's time: a later kill often finds the run at its end,
        # which ends the chain before its checkpoint-moment kills.
        until = time.time() + rng.uniform(0.5, max(0.6 * run_s, 1.0))
        while proc.poll() is None and time.time() < until:
            time.sleep(0.01)
    else:
        prefix = ".tmp-step-" if moment == "during_checkpoint" else "step-"
        seen = _checkpoints(out, prefix) if moment == "after_checkpoint" else set()
        # Busy-polled: a small model writes a checkpoint in a few milliseconds.
        while proc.poll() is None and time.time() < deadline and not (_checkpoints(out, prefix) - seen):
            pass
    if proc.poll() is not None:
        return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"killed {moment}"


def _run_to_end(train_args: list[str], out: Path) -> float:
    t0 = time.time()
    proc = _start(train_args, out)
    err = proc.communicate()[1]
    if proc.returncode != 0:
        raise SystemExit(f"kill_resume_loop: {out}: vlmtrain train exited {proc.returncode}:\n{err[-2000:]}")
    return time.time() - t0


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(tensors that differ, max |a - b|) of two state dicts with the same keys."""
    if a.keys() != b.keys():
        raise SystemExit(f"kill_resume_loop: weights have different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    diffs = [(a[k].double() - b[k].double()).abs().max().item() for k in a]
    return sum(d > 0 for d in diffs), max(diffs)


def kill_loop(train_args: list[str], work: Path, kills: int, chains: int, seed: int = 0) -> dict:
    """Run the experiment in ``work`` (emptied first) and return its summary."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(seed)
    run_s = min(_run_to_end(train_args, work / "ref1"), _run_to_end(train_args, work / "ref2"))
    ref = load_file(work / "ref1" / "model" / "model.safetensors")
    spread = _max_diff(ref, load_file(work / "ref2" / "model" / "model.safetensors"))
    summary: dict = {"train_args": train_args, "run_s": round(run_s, 1), "ref_spread": {
        "tensors_differ": spread[0], "max_abs_diff": spread[1]}, "chains": []}
    made = 0  # kills so far; the moments cycle over the whole loop, so a chain that ended early
    for c in range(3 * chains):  # leaves its moment to the next chain
        if made >= kills:
            break
        out = work / f"chain{c}"
        n = min(-(-kills // chains), kills - made)  # ceil(kills / chains), never past the total
        events = []
        while len(events) < n:
            moment = MOMENTS[(made + sum(e.startswith("killed") for e in events)) % len(MOMENTS)]
            events.append(_kill(_start(train_args, out), out, moment, rng, run_s))
            if events[-1] == "finished":  # the run reached its end before this kill: the chain is done
                break
        else:
            _run_to_end(train_args, out)
        differ, diff = _max_diff(ref, load_file(out / "model" / "model.safetensors"))
        chain = {"chain": c, "kills": sum(e.startswith("killed") for e in events), "events": events,
                 "tensors_differ": differ, "max_abs_diff": diff}
        made += chain["kills"]
        summary["chains"].append(chain)
        print(f"chain {c}: {chain['kills']} kills ({', '.join(events)}); vs ref1: {differ} tensors differ, "
              f"max |diff| {diff:.3g}", flush=True)
    summary["kills"] = sum(ch["kills"] for ch in summary["chains"])
    summary["bitwise_equal"] = all(ch["tensors_differ"] == 0 for ch in summary["chains"])
    summary["within_spread"] = all(ch["max_abs_diff"] <= spread[1] for ch in summary["chains"])
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=24, help="SIGKILLs in all (default 24)")
    p.add_argument("--chains", type=int, default=3, help="kill-and-resume chains (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    p.add_argument("--work", type=Path, default=Path("runs/kill_resume_loop"), help="scratch directory (emptied)")
    p.add_argument("--within-spread", action="store_true",
                   help="pass when no chain is further from ref1 than ref2 is (default: bitwise equal)")
    p.add_argument("train_args", nargs="+", help="vlmtrain train arguments, after --")
    a = p.parse_args(argv)
    if a.kills < a.chains or a.chains < 1:
        p.error(f"--kills {a.kills} must be >= --chains {a.chains} >= 1")
    summary = kill_loop(a.train_args, a.work, a.kills, a.chains, a.seed)
    print(json.dumps(summary))
    ok = summary["within_spread"] if a.within_spread else summary["bitwise_equal"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
