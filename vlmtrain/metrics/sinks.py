"""Metric sinks behind one tiny protocol: ``log(step, metrics)`` and ``close()``.

Keys are fixed and namespaced (``loss/train``, ``throughput/tokens_per_s`` ...) so runs compare.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Sink(Protocol):
    """Anything that takes metric dicts."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for an empty or half-written line (a crash mid-write)."""
    try:
        return int(json.loads(line).get("step", 0)) if line.strip() else None
    except (ValueError, AttributeError):
        return None


class JsonlSink:
    """Appends one JSON object per log step to ``metrics.jsonl`` (flushed, so a killed run keeps its lines)."""

    def __init__(self, path: str | Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # A resumed run rewrites the steps after its checkpoint: drop the killed run's later lines.
            kept = [line for line in self.path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= truncate_after_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one line ``{"step": step, **metrics}``."""
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


class NullSink:
    """What non-zero ranks get: accepts everything, writes nothing."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Discard."""

    def close(self) -> None:
        """Nothing to close."""
