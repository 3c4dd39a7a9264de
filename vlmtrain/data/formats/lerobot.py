"""Reader for LeRobot v2.1 vision-language navigation datasets (InternData-N1, GridNav).

See ``docs/data_formats.md`` for the layout. One dataset root holds ``meta/info.json``,
``meta/episodes.jsonl``, optional ``meta/tasks.jsonl``, one parquet per episode and one JPEG per
frame and camera setting. `read_lerobot_vln` turns a root into `VLNEpisode` records: instructions,
per-frame decision targets, frame paths and camera poses. Every defect is reported as a `DataError`
that names the file and the episode and goes through an `ErrorPolicy` (raise, or skip and count).

Speed matters because InternData-N1 has thousands of short episodes per scene: each parquet is
opened once and only the needed columns are read, and frame existence is checked with one
``os.listdir`` per frame directory (shared by all episodes of a chunk) instead of a stat per frame.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlmtrain.data.errors import DataError, ErrorPolicy

__all__ = [
    "ACTION_SYMBOLS",
    "DEFAULT_CHUNKS_SIZE",
    "DEFAULT_DATA_PATH",
    "DEFAULT_FRAME_PATH",
    "STOP",
    "VALID_ACTIONS",
    "VLNEpisode",
    "iter_dataset_roots",
    "read_lerobot_vln",
    "rgb_video_key",
]

STOP = 0
VALID_ACTIONS: frozenset[int] = frozenset({0, 1, 2, 3})
ACTION_SYMBOLS: dict[int, str] = {0: "STOP", 1: "↑", 2: "←", 3: "→"}
# The `action` column holds the action that led *into* a frame, so frame 0 has none.
NO_ACTION = -1

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


@dataclass(frozen=True, eq=False)
class VLNEpisode:
    """One navigation episode, ready to be turned into training samples.

    ``eq=False`` because the numpy fields make field-wise equality ambiguous; episodes compare by
    identity. The arrays are made read-only so the record is immutable in practice too.

    Attributes:
        root: dataset root the episode was read from.
        episode_index: index from ``meta/episodes.jsonl``.
        instructions: the episode's ``tasks`` (one or more instruction strings).
        targets: int64 (T,), decision target per frame: ``expert_action[t]`` when that column
            exists, else ``action[t+1]``; STOP (0) at the last frame.
        frame_paths: T RGB frame files of the requested camera setting.
        poses: float32 (T, 4, 4) camera-to-world poses.
    """

    root: Path
    episode_index: int
    instructions: tuple[str, ...]
    targets: np.ndarray
    frame_paths: tuple[Path, ...]
    poses: np.ndarray

    @property
    def length(self) -> int:
        """Number of frames T."""
        return int(self.targets.shape[0])


@dataclass(frozen=True)
class _Layout:
    """Where the files of one root live, from ``meta/info.json``."""

    root: Path
    chunks_size: int
    data_path: str
    frame_path: str
    video_key: str
    pose_column: str


@dataclass(frozen=True)
class _EpisodeMeta:
    """One validated line of ``meta/episodes.jsonl``."""

    episode_index: int
    length: int
    instructions: tuple[str, ...]


def iter_dataset_roots(path: str | PathLike[str]) -> list[Path]:
    """Dataset roots under `path`: ``[path]`` if it is a root, else every nested root, sorted.

    InternData-N1 keeps one LeRobot root per scene, so a corpus directory holds many roots. A
    directory is a root when it has ``meta/info.json``; the walk does not descend into a root, so
    the (large) frame folders are never listed.
    """
    base = Path(path)
    if (base / INFO_FILE).is_file():
        return [base]
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: not a directory")
    roots: list[Path] = []
    for dirpath, dirnames, _ in os.walk(base):
        current = Path(dirpath)
        if (current / INFO_FILE).is_file():
            roots.append(current)
            dirnames.clear()
            continue
        dirnames.sort()
    return sorted(roots)


def read_lerobot_vln(
    root: str | PathLike[str],
    setting: str = "125cm_0deg",
    policy: ErrorPolicy | None = None,
    check_frames: bool = True,
) -> list[VLNEpisode]:
    """Read every episode of one LeRobot v2.1 VLN root for one camera `setting`.

    Args:
        root: dataset root (the folder holding ``meta/``).
        setting: camera setting ``<height>cm_<pitch>deg``; selects ``pose.<setting>`` and the
            ``observation.images.rgb.<setting>`` frames.
        policy: what to do with a bad episode; default raises the first `DataError`. In skip mode
            a bad episode is dropped (counted once, under the reason of its first defect) and
            reading continues.
        check_frames: verify that every frame file exists.

    Returns:
        The good episodes, in ``meta/episodes.jsonl`` order.

    Raises:
        DataError: in raise mode, on the first defect (missing or malformed metadata, missing
            parquet, missing column, row count mismatch, bad frame index, unknown action id,
            missing frame file).
    """
    root = Path(root)
    policy = policy if policy is not None else ErrorPolicy("raise")
    try:
        layout = _read_layout(root, setting)
    except DataError as err:
        # Without info.json nothing in the root can be located: the whole root is skipped.
        policy.handle(err)
        return []
    task_names = _read_tasks(root, policy)
    metas = _read_episode_metas(root, task_names, policy)
    # Shared across episodes: all episodes of a chunk keep their frames in the same folder.
    listings: dict[str, frozenset[str]] = {}
    episodes: list[VLNEpisode] = []
    for meta in metas:
        try:
            episodes.append(_read_episode(layout, meta, check_frames, listings))
        except DataError as err:
            policy.handle(err)
    return episodes


# ---------------------------------------------------------------------------------------------
# metadata


def _read_layout(root: Path, setting: str) -> _Layout:
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
    return _Layout(
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


def _read_tasks(root: Path, policy: ErrorPolicy) -> dict[int, str]:
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


def _read_episode_metas(
    root: Path, task_names: dict[int, str], policy: ErrorPolicy
) -> list[_EpisodeMeta]:
    """Parse and validate ``meta/episodes.jsonl``; bad lines go to the policy."""
    path = root / EPISODES_FILE
    if not path.is_file():
        policy.handle(DataError(path, "missing_file", detail="dataset root has no episodes.jsonl"))
        return []
    metas: list[_EpisodeMeta] = []
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
) -> _EpisodeMeta:
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
    return _EpisodeMeta(episode_index=index, length=length, instructions=tuple(instructions))


# ---------------------------------------------------------------------------------------------
# episodes


def _read_episode(
    layout: _Layout,
    meta: _EpisodeMeta,
    check_frames: bool,
    listings: dict[str, frozenset[str]],
) -> VLNEpisode:
    """Read and validate one episode parquet and its frames."""
    index = meta.episode_index
    chunk = index // layout.chunks_size
    pq_path = layout.root / layout.data_path.format(episode_chunk=chunk, episode_index=index)
    table = _read_columns(pq_path, index, meta.length, layout.pose_column)
    n_rows = meta.length

    frame_index = _int_column(table, "frame_index", pq_path, index)
    if not np.array_equal(frame_index, np.arange(n_rows)):
        row = int(np.flatnonzero(frame_index != np.arange(n_rows))[0])
        raise DataError(
            pq_path,
            "bad_frame_index",
            index,
            f"frame_index must be 0..{n_rows - 1} in order; row {row} has {int(frame_index[row])}",
        )

    action = _int_column(table, "action", pq_path, index)
    bad = (action < 0) | (action > 3)
    bad[0] = not (NO_ACTION <= action[0] <= 3)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            pq_path,
            "unknown_action",
            index,
            f"row {row}: action {int(action[row])} is not one of {sorted(VALID_ACTIONS)}"
            " (-1 is allowed only at row 0)",
        )

    if "expert_action" in table.column_names:
        expert = _int_column(table, "expert_action", pq_path, index)
        bad = (expert < 0) | (expert > 3)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                pq_path,
                "unknown_action",
                index,
                f"row {row}: expert_action {int(expert[row])} is not one of "
                f"{sorted(VALID_ACTIONS)}",
            )
        targets = expert.copy()
    else:
        targets = np.empty(n_rows, dtype=np.int64)
        targets[:-1] = action[1:]
    targets[-1] = STOP

    pose_col = table.column(layout.pose_column)
    poses = _pose_array(pose_col, n_rows, pq_path, index, layout.pose_column)
    frame_paths = _frame_paths(layout, chunk, index, n_rows, check_frames, listings)

    targets.setflags(write=False)
    poses.setflags(write=False)
    return VLNEpisode(
        root=layout.root,
        episode_index=index,
        instructions=meta.instructions,
        targets=targets,
        frame_paths=frame_paths,
        poses=poses,
    )


def _read_columns(pq_path: Path, index: int, length: int, pose_column: str) -> pa.Table:
    """Open the parquet once, check columns and row count, and read only the needed columns."""
    try:
        pf = pq.ParquetFile(pq_path)
    except FileNotFoundError:
        raise DataError(
            pq_path,
            "missing_file",
            index,
            "episode parquet not found (listed in meta/episodes.jsonl)",
        )
    except (OSError, pa.ArrowException) as exc:
        raise DataError(pq_path, "bad_parquet", index, f"cannot open parquet: {exc}")
    with pf:
        names = pf.schema_arrow.names
        wanted = ["action", pose_column, "frame_index"]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataError(
                pq_path,
                "missing_column",
                index,
                f"missing column(s) {', '.join(missing)}; present: {', '.join(names)}",
            )
        if "expert_action" in names:
            wanted.append("expert_action")
        n_rows = pf.metadata.num_rows
        if n_rows != length:
            raise DataError(
                pq_path,
                "length_mismatch",
                index,
                f"parquet has {n_rows} rows but meta/episodes.jsonl says length {length}",
            )
        try:
            return pf.read(columns=wanted)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(pq_path, "bad_parquet", index, f"cannot read columns {wanted}: {exc}")


def _int_column(table: pa.Table, name: str, pq_path: Path, index: int) -> np.ndarray:
    """A non-null integer column as int64 numpy."""
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise DataError(pq_path, "bad_dtype", index, f"column {name} has type {col.type}, want int")
    if col.null_count:
        raise DataError(pq_path, "null_value", index, f"column {name} has {col.null_count} nulls")
    return np.asarray(col.to_numpy(), dtype=np.int64)


def _is_list_type(t: pa.DataType) -> bool:
    """True for any Arrow list type (variable, large or fixed-size)."""
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _pose_array(
    col: pa.ChunkedArray, n_rows: int, pq_path: Path, index: int, name: str
) -> np.ndarray:
    """Camera poses as float32 (T, 4, 4) from a nested 4x4 or flat 16-element list column."""
    arr: pa.Array = col.combine_chunks()
    dims: list[int] = []
    while _is_list_type(arr.type):
        if arr.null_count:
            raise DataError(pq_path, "bad_pose", index, f"column {name} has null entries")
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise DataError(
                pq_path,
                "bad_pose",
                index,
                f"column {name}: ragged lists (entry {row} has {lengths[row]})",
            )
        dims.append(int(lengths[0]) if len(lengths) else 0)
        arr = arr.flatten()
    if dims not in ([4, 4], [16]):
        raise DataError(
            pq_path,
            "bad_pose",
            index,
            f"column {name}: want 4x4 or 16 values per row, got shape {dims}",
        )
    if not (pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type)) or arr.null_count:
        raise DataError(
            pq_path, "bad_pose", index, f"column {name}: values must be non-null numbers"
        )
    values = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(n_rows, 4, 4)


def _frame_paths(
    layout: _Layout,
    chunk: int,
    index: int,
    n_rows: int,
    check_frames: bool,
    listings: dict[str, frozenset[str]],
) -> tuple[Path, ...]:
    """The T frame files of an episode, checked against cached directory listings."""
    # Strings first, Paths last: pathlib parsing dominated the reader's profile, so each frame
    # folder is parsed once and frames are joined to it as bare names.
    folders: dict[str, tuple[Path, frozenset[str]]] = {}
    paths: list[Path] = []
    for t in range(n_rows):
        rel = layout.frame_path.format(
            episode_chunk=chunk, episode_index=index, video_key=layout.video_key, frame_index=t
        )
        folder_rel, _, name = rel.rpartition("/")
        entry = folders.get(folder_rel)
        if entry is None:
            folder = layout.root / folder_rel
            names = _listing(folder, listings) if check_frames else frozenset()
            entry = folders[folder_rel] = (folder, names)
        folder, names = entry
        if check_frames and name not in names:
            raise DataError(
                folder / name,
                "missing_frame",
                index,
                f"frame {t} of {n_rows} not found (camera folder {layout.video_key})",
            )
        paths.append(folder / name)
    return tuple(paths)


def _listing(folder: Path, listings: dict[str, frozenset[str]]) -> frozenset[str]:
    """File names in `folder` (empty when it does not exist), listed once per reader call."""
    key = str(folder)
    names = listings.get(key)
    if names is None:
        try:
            names = frozenset(os.listdir(key))
        except (FileNotFoundError, NotADirectoryError):
            names = frozenset()
        listings[key] = names
    return names
