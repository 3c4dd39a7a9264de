"""Names of data sources as a config writes them: ``name%N`` and InternVLA-N1 dataset names.

Part of the config layer (``config.py`` validates them; the readers in ``data/`` parse them), so the
config never imports the data package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["N1DatasetName", "parse_dataset_name", "parse_source_spec"]

_PERCENT = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)$")


def parse_source_spec(spec: str) -> tuple[str, float]:
    """Split ``"name%N"`` into ``(name, N)``; a bare ``"name"`` means 100 %.

    ``N`` is a non-negative decimal number (``50``, ``12.5``, ``250``).

    Raises:
        ValueError: empty name, more than one ``%``, or ``N`` not a number.
    """
    name, sep, pct = spec.strip().partition("%")
    if not name:
        raise ValueError(
            f"bad source spec {spec!r}: empty dataset name (expected 'name' or 'name%N')"
        )
    if not sep:
        return name, 100.0
    if "%" in pct or not _PERCENT.match(pct):
        raise ValueError(
            f"bad source spec {spec!r}: expected 'name%N' with N a non-negative number, "
            f"e.g. '{name}%50' or '{name}%250'"
        )
    return name, float(pct)


_NAME = re.compile(
    r"^(?P<corpus>[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*?)_(?P<h>\d+)cm_(?P<p1>\d+)_(?P<p2>\d+)$"
)


@dataclass(frozen=True)
class N1DatasetName:
    """A parsed InternVLA-N1 dataset name.

    Attributes:
        name: the name without ``%N`` (used as the samples' ``source``).
        corpus: e.g. ``r2r``, ``rxr``, ``scalevln``.
        height_cm: camera height.
        history_pitch: pitch (degrees down) of the history/current camera.
        lookdown_pitch: pitch of the look-down camera.
        percent: share of built samples to keep (100 when no ``%N``).
    """

    name: str
    corpus: str
    height_cm: int
    history_pitch: int
    lookdown_pitch: int
    percent: float = 100.0

    @property
    def history_setting(self) -> str:
        """Camera setting of history and current frames, e.g. ``125cm_0deg``."""
        return f"{self.height_cm}cm_{self.history_pitch}deg"

    @property
    def lookdown_setting(self) -> str:
        """Camera setting of the look-down frame and the goal column, e.g. ``125cm_30deg``."""
        return f"{self.height_cm}cm_{self.lookdown_pitch}deg"


def parse_dataset_name(spec: str) -> N1DatasetName:
    """Parse ``<corpus>_<height>cm_<history pitch>_<look-down pitch>[%N]``.

    Raises:
        ValueError: the name does not have that form, or ``%N`` is not a number.
    """
    name, percent = parse_source_spec(spec)
    match = _NAME.match(name)
    if match is None:
        raise ValueError(
            f"bad InternVLA-N1 dataset name {spec!r}: expected "
            "'<corpus>_<height>cm_<history pitch>_<look-down pitch>[%N]', e.g. 'r2r_125cm_0_30%50'"
        )
    return N1DatasetName(
        name=name,
        corpus=match["corpus"],
        height_cm=int(match["h"]),
        history_pitch=int(match["p1"]),
        lookdown_pitch=int(match["p2"]),
        percent=percent,
    )
