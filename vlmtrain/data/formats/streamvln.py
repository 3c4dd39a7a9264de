"""Reader for StreamVLN trajectory folders, into the same `VLNEpisode` the LeRobot reader yields.

::

    ROOT/annotations.json      [{"id": 7, "video": "images/17DRP5sb8fy_r2r_000007",
                                 "instructions": ["Walk past ..."],
                                 "actions": [-1, 1, 1, 2, ..., 0]}, ...]
    ROOT/<video>/rgb/*.jpg     one frame per step, ordered by the number at the end of the name

Alignment (what StreamVLN's own loader does with ``actions[1:] + [0]``): when ``actions`` starts
with ``-1``, ``actions[i]`` is the action that led *into* frame ``i`` (as the LeRobot ``action``
column), the episode has ``T == len(actions)`` frames, and the target at frame ``t`` is
``actions[t + 1]``, STOP at the last frame. Without the leading ``-1``, ``actions[t]`` is the action
taken *at* frame ``t``, again ``T == len(actions)``, and the last frame's target is STOP. Either
way the target at frame ``t`` is the action taken at ``t``. Action ids are VLN-CE's (0 STOP,
1 forward 0.25 m, 2 left 15°, 3 right 15°); ``-1`` is allowed only first.

``episode_index`` is the entry's position in ``annotations.json`` (StreamVLN ids need not be
ints); StreamVLN has no camera poses, so ``poses`` is all NaN. See ``docs/data_formats.md``.
"""

from __future__ import annotations

import json
import os
import re
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.lerobot import STOP, VLNEpisode, check_actions

__all__ = ["ANNOTATIONS_FILE", "FRAME_SUFFIXES", "read_streamvln", "streamvln_targets"]

ANNOTATIONS_FILE = "annotations.json"
FRAME_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def read_streamvln(
    root: str | PathLike[str], policy: ErrorPolicy | None = None
) -> list[VLNEpisode]:
    """Read every trajectory of one StreamVLN folder (R2R, RxR, EnvDrop, ScaleVLN...).

    Args:
        root: the folder holding ``annotations.json``.
        policy: what to do with a bad episode; default raises the first `DataError`.

    Returns:
        The good episodes, in ``annotations.json`` order. Frames are listed from disk (one
        ``os.listdir`` per episode), so every returned frame path exists.

    Raises:
        DataError: in raise mode, on the first defect: ``missing_file`` / ``bad_json`` /
            ``bad_meta`` (annotations.json), ``bad_record`` (an entry's keys), ``unknown_action``,
            ``missing_frame`` (no frame folder), ``bad_frame_name`` (a frame name without a
            number), ``length_mismatch`` (frame count != len(actions)).
    """
    root = Path(root)
    policy = policy if policy is not None else ErrorPolicy("raise")
    ann_path = root / ANNOTATIONS_FILE
    try:
        entries = json.loads(ann_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        policy.handle(
            DataError(ann_path, "missing_file", detail="StreamVLN root has no annotations.json")
        )
        return []
    except json.JSONDecodeError as exc:
        policy.handle(
            DataError(ann_path, "bad_json", f"line {exc.lineno}", f"invalid JSON: {exc.msg}")
        )
        return []
    if not isinstance(entries, list):
        policy.handle(
            DataError(ann_path, "bad_meta", detail="expected a JSON list of trajectories")
        )
        return []
    episodes: list[VLNEpisode] = []
    for index, entry in enumerate(entries):
        try:
            episodes.append(_read_episode(root, ann_path, index, entry))
        except DataError as err:
            policy.handle(err)
    return episodes


def _record(index: int, entry: Any) -> str:
    """Error label naming both the position and the StreamVLN id."""
    if isinstance(entry, dict) and "id" in entry:
        return f"episode {index} (id {entry['id']!r})"
    return f"episode {index}"


def _read_episode(root: Path, ann_path: Path, index: int, entry: Any) -> VLNEpisode:
    """Validate one annotation entry and list its frames."""
    record = _record(index, entry)
    if not isinstance(entry, dict):
        raise DataError(ann_path, "bad_record", record, "entry must be an object")
    video = entry.get("video")
    if not isinstance(video, str) or not video:
        raise DataError(ann_path, "bad_record", record, "missing or empty 'video' path")
    instructions = entry.get("instructions")
    # StreamVLN's loader also accepts a single string.
    if isinstance(instructions, str):
        instructions = [instructions]
    if (
        not isinstance(instructions, list)
        or not instructions
        or not all(isinstance(s, str) for s in instructions)
    ):
        raise DataError(
            ann_path, "bad_record", record, "'instructions' must be a non-empty list of strings"
        )
    actions = entry.get("actions")
    if (
        not isinstance(actions, list)
        or not actions
        or not all(isinstance(a, int) and not isinstance(a, bool) for a in actions)
    ):
        raise DataError(
            ann_path, "bad_record", record, "'actions' must be a non-empty list of ints"
        )

    targets = streamvln_targets(actions, ann_path, record)
    frame_paths = _list_frames(root / video / "rgb", record)
    if len(frame_paths) != len(actions):
        raise DataError(
            ann_path,
            "length_mismatch",
            record,
            f"{len(frame_paths)} frames in {root / video / 'rgb'} but {len(actions)} actions "
            "(want one action per frame, the first being -1 or the action taken at frame 0)",
        )
    targets.setflags(write=False)
    poses = np.full((len(frame_paths), 4, 4), np.nan, dtype=np.float32)
    poses.setflags(write=False)
    return VLNEpisode(
        root=root,
        episode_index=index,
        instructions=tuple(instructions),
        targets=targets,
        frame_paths=frame_paths,
        poses=poses,
    )


def streamvln_targets(
    actions: list[int], path: str | PathLike[str] = ANNOTATIONS_FILE, record: str | None = None
) -> np.ndarray:
    """Per-frame decision targets (int64, length ``len(actions)``) from a StreamVLN action list.

    With a leading ``-1``: ``targets[t] = actions[t + 1]``; otherwise ``targets[t] = actions[t]``;
    the last target is STOP in both cases (the episode ends there).

    Raises:
        DataError: ``unknown_action`` for an id outside {0, 1, 2, 3} (``-1`` only first).
    """
    arr = np.asarray(actions, dtype=np.int64)
    check_actions(arr, path, record, lambda i: f"actions[{i}] =", "the first")
    targets = np.empty(len(arr), dtype=np.int64)
    if arr[0] == -1:
        targets[:-1] = arr[1:]
    else:
        targets[:] = arr
    targets[-1] = STOP
    return targets


def _list_frames(folder: Path, record: str) -> tuple[Path, ...]:
    """Frame files of one trajectory, ordered by the number ending each name.

    Numeric, not lexicographic, order: ``2.jpg`` comes before ``10.jpg``.
    """
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(folder, "missing_frame", record, "frame folder not found")
    keyed: list[tuple[int, str]] = []
    for name in names:
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in FRAME_SUFFIXES:
            continue
        match = _TRAILING_NUMBER.search(stem)
        if match is None:
            raise DataError(
                folder / name, "bad_frame_name", record, "frame name has no frame number"
            )
        keyed.append((int(match.group(1)), name))
    keyed.sort()
    for (a, name_a), (b, name_b) in zip(keyed, keyed[1:]):
        if a == b:
            raise DataError(
                folder / name_b, "bad_frame_name", record, f"same frame number as {name_a}"
            )
    return tuple(folder / name for _, name in keyed)
