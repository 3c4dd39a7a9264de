"""Metadata parsing for LeRobot v2.1 VLN dataset roots (see `vlmtrain.data.formats.lerobot`).

Parses the three small files under ``meta/`` that describe a root before any parquet is opened:

* ``meta/info.json``: chunk size and the path templates of episode parquets and frame JPEGs
  (`read_layout` -> `Layout`);
* ``meta/episodes.jsonl``: one line per episode with its index, length and instructions
  (`read_episode_metas` -> `EpisodeMeta`);
* ``meta/tasks.jsonl`` (optional): task_index -> task text, used when episodes list task indices
  instead of strings (`read_tasks`).

Every defect is reported as a `DataError` naming the file (and the episode when known); defects in
the JSONL files go through the caller's `ErrorPolicy` line by line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vlmtrain.data.errors import DataError, ErrorPolicy

__all__ = [
    "DEFAULT_CHUNKS_SIZE",
    "DEFAULT_DATA_PATH",
    "DEFAULT_FRAME_PATH",
    "EPISODES_FILE",
    "INFO_FILE",
    "TASKS_FILE",
    "EpisodeMeta",
    "Layout",
    "read_episode_metas",
    "read_layout",
    "read_tasks",
    "rgb_video_key",
]

DEFAULT_CHUNKS_SIZE = 1000
DEFAULT_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
DEFAULT_FRAME_PATH = (
    "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}_{frame_index}.jpg"
)

INFO_FILE = "meta/info.json"
EPISODES_FILE = "meta/episodes.jsonl"
TASKS_FILE = "meta/tasks.jsonl"

# Finds the episode of a line that is not valid JSON, so the error can still name it.
_EPISODE_IN_LINE = re.compile(r'"episode_index"\s*:\s*(\d+)')


def rgb_video_key(setting: str) -> str:
    """Folder of a camera setting's RGB frames, e.g. ``observation.images.rgb.125cm_0deg``."""
    return f"observation.images.rgb.{setting}"


@dataclass(frozen=True)
class Layout:
    """Where the files of one root live, from ``meta/info.json``."""

    root: Path
    chunks_size: int
    data_path: str
    frame_path: str
    video_key: str
    pose_column: str


@dataclass(frozen=True)
class EpisodeMeta:
    """One validated line of ``meta/episodes.jsonl``."""

    episode_index: int
    length: int
    instructions: tuple[str, ...]


def read_layout(root: Path, setting: str) -> Layout:
    """Parse ``meta/info.json`` into file templates and the chunk size."""
    info_path = root / INFO_FILE
    try:
        text = info_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(info_path, "missing_file", detail="dataset root has no meta/info.json")
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(info_path, "bad_json", detail=f"line {exc.lineno}: {exc.msg}")
    if not isinstance(info, dict):
        raise DataError(info_path, "bad_meta", detail="expected a JSON object")

    chunks_size = info.get("chunks_size", DEFAULT_CHUNKS_SIZE)
    if not isinstance(chunks_size, int) or isinstance(chunks_size, bool) or chunks_size <= 0:
        raise DataError(
            info_path, "bad_meta", detail=f"chunks_size must be a positive int, got {chunks_size!r}"
        )
    data_path = info.get("data_path") or DEFAULT_DATA_PATH
    # Plain LeRobot points video_path at one mp4 per episode; VLN data stores one JPEG per frame,
    # so only a template that addresses single frames can replace the default.
    video_path = info.get("video_path")
    frame_path = (
        video_path
        if isinstance(video_path, str) and "{frame_index" in video_path
        else DEFAULT_FRAME_PATH
    )
    video_key = rgb_video_key(setting)
    for name, template in (("data_path", data_path), ("video_path", frame_path)):
        try:
            template.format(episode_chunk=0, episode_index=0, video_key=video_key, frame_index=0)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise DataError(
                info_path, "bad_meta", detail=f"cannot use {name} template {template!r}: {exc!r}"
            )
    return Layout(
        root=root,
        chunks_size=chunks_size,
        data_path=data_path,
        frame_path=frame_path,
        video_key=video_key,
        pose_column=f"pose.{setting}",
    )


def _iter_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, stripped text) for each non-blank line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if line:
                yield lineno, line


def read_tasks(root: Path, policy: ErrorPolicy) -> dict[int, str]:
    """Map task_index -> task text from the optional ``meta/tasks.jsonl``.

    Only needed when ``episodes.jsonl`` lists task indices instead of task strings, so a bad line
    here is reported but never fatal for the root in skip mode.
    """
    path = root / TASKS_FILE
    if not path.is_file():
        return {}
    tasks: dict[int, str] = {}
    for lineno, line in _iter_jsonl(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            policy.handle(DataError(path, "bad_json", f"line {lineno}", f"invalid JSON: {exc.msg}"))
            continue
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("task_index"), int)
            or not isinstance(obj.get("task"), str)
        ):
            policy.handle(
                DataError(
                    path, "bad_meta", f"line {lineno}", "expected {task_index: int, task: str}"
                )
            )
            continue
        tasks[obj["task_index"]] = obj["task"]
    return tasks


def read_episode_metas(
    root: Path, task_names: dict[int, str], policy: ErrorPolicy
) -> list[EpisodeMeta]:
    """Parse and validate ``meta/episodes.jsonl``; bad lines go to the policy."""
    path = root / EPISODES_FILE
    if not path.is_file():
        policy.handle(DataError(path, "missing_file", detail="dataset root has no episodes.jsonl"))
        return []
    metas: list[EpisodeMeta] = []
    seen: set[int] = set()
    for lineno, line in _iter_jsonl(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            # The line is broken, but the episode index usually survives: name it if we can.
            m = _EPISODE_IN_LINE.search(line)
            record: int | str = int(m.group(1)) if m else f"line {lineno}"
            policy.handle(
                DataError(path, "bad_json", record, f"line {lineno}: invalid JSON: {exc.msg}")
            )
            continue
        try:
            meta = _parse_episode_meta(obj, task_names, path, lineno)
            if meta.episode_index in seen:
                raise DataError(
                    path, "bad_meta", meta.episode_index, f"line {lineno}: duplicate episode_index"
                )
        except DataError as err:
            policy.handle(err)
            continue
        seen.add(meta.episode_index)
        metas.append(meta)
    return metas


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_episode_meta(
    obj: Any, task_names: dict[int, str], path: Path, lineno: int
) -> EpisodeMeta:
    """Validate one decoded episodes.jsonl line."""
    where = f"line {lineno}"
    if not isinstance(obj, dict):
        raise DataError(path, "bad_meta", where, "expected a JSON object")
    index = obj.get("episode_index")
    if not _is_int(index) or index < 0:
        raise DataError(
            path, "bad_meta", where, f"episode_index must be an int >= 0, got {index!r}"
        )
    length = obj.get("length")
    if not _is_int(length) or length < 1:
        raise DataError(
            path, "bad_meta", index, f"{where}: length must be an int >= 1, got {length!r}"
        )
    tasks = obj.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise DataError(path, "bad_meta", index, f"{where}: tasks must be a non-empty list")
    instructions: list[str] = []
    for task in tasks:
        if isinstance(task, str):
            instructions.append(task)
        elif _is_int(task) and task in task_names:
            # Some exports list task indices; resolve them through meta/tasks.jsonl.
            instructions.append(task_names[task])
        else:
            raise DataError(path, "bad_meta", index, f"{where}: unresolvable task {task!r}")
    return EpisodeMeta(episode_index=index, length=length, instructions=tuple(instructions))

