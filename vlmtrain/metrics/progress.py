"""One progress bar (rich) on an interactive terminal; plain log lines otherwise."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


class Progress:
    """Shows step, loss, lr and throughput; prints a line per log step when not on a terminal."""

    def __init__(self, total: int, start: int, enabled: bool = True, silent: bool = False):
        self.console = Console(stderr=True)
        self.silent = silent  # print nothing at all (ranks other than 0)
        self.live = enabled and not silent and self.console.is_terminal
        self.total = total
        self._bar = None
        if self.live:
            self._bar = RichProgress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), console=self.console,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, metrics: dict | None = None) -> None:
        """Advance to ``step``; ``metrics`` (a log step) refreshes the shown values."""
        info = None
        if metrics:
            loss = f"{metrics['loss/train']:.4f}" if "loss/train" in metrics else "skipped (non-finite)"
            info = (f"loss {loss}  lr {metrics['optim/lr']:.2e}  "
                    f"{metrics['throughput/samples_per_s']:.0f} samples/s")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, **({"info": info} if info else {}))
        elif info and not self.silent:
            print(f"step {step}/{self.total}  {info}", file=sys.stderr, flush=True)
