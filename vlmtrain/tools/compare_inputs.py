"""The inputs of ``vlmtrain compare``: a YAML config or a run directory as a :class:`Column`, and the
``--s-per-it`` values. Bad inputs raise FileNotFoundError, ConfigError or UsageError (one line each)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from vlmtrain.config import ConfigError, RunConfig, load_config
from vlmtrain.errors import UsageError

__all__ = ["Column", "load_column", "parse_s_per_it"]


@dataclass
class Column:
    """One compared input: a config file (``kind="config"``) or a run directory (``kind="run"``)."""

    label: str  # column header: the file's stem or the run directory's name
    path: str  # the argument as given
    kind: str
    cfg: RunConfig
    ranks: int  # GPUs (ranks): --gpus for a config, summary world_size for a run
    s_per_it: Optional[float] = None  # seconds per optimizer step given with --s-per-it
    summary: dict = field(default_factory=dict)  # a run's summary.json ({} when absent)
    metrics: list[dict] = field(default_factory=list)  # a run's metrics.jsonl lines


def parse_s_per_it(text: Optional[str], n_columns: int) -> list[Optional[float]]:
    """``--s-per-it 3.5,6.11``: one value per column, an empty one for none (``3.5,``)."""
    if text is None:
        return [None] * n_columns
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != n_columns:
        raise UsageError(f"--s-per-it {text}: {len(parts)} value(s) for {n_columns} columns; give one per "
                         "column, empty for none (e.g. 3.5,)")
    out: list[Optional[float]] = []
    for p in parts:
        try:
            value = float(p) if p else None
        except ValueError:
            raise UsageError(f"--s-per-it {text}: {p!r} is not a number of seconds") from None
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--s-per-it {text}: {p} must be > 0")
        out.append(value)
    return out


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _load_yaml_config(path: Path) -> RunConfig:
    try:
        return load_config(RunConfig(), path, [])
    except ConfigError as e:
        message = _one_line(str(e))
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a YAML config ({_one_line(str(e))})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not JSON ({e})") from None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # a run killed mid-write leaves half a last line
                break
            raise UsageError(f"{path}: line {i + 1} is not JSON ({e})") from None
    return out


def load_column(path: str | Path, gpus: int = 1, s_per_it: Optional[float] = None) -> Column:
    """A config file or run directory as a column. Raises FileNotFoundError for a missing path or a
    directory without ``config.yaml``, ConfigError for a config that does not load."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such config file or run directory")
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise FileNotFoundError(f"{path}: not a run directory (no config.yaml; `vlmtrain train` writes one)")
        cfg = _load_yaml_config(p / "config.yaml")
        summary = _read_json(p / "summary.json")
        return Column(p.resolve().name, str(path), "run", cfg, int(summary.get("world_size", 1)), s_per_it,
                      summary, _read_jsonl(p / "metrics.jsonl"))
    return Column(p.stem, str(path), "config", _load_yaml_config(p), gpus, s_per_it)
