"""Reader for LeRobot v2.1 vision-language navigation datasets (InternData-N1, GridNav).

See ``docs/data_formats.md`` for the layout. One dataset root holds ``meta/info.json``,
``meta/episodes.jsonl``, optional ``meta/tasks.jsonl``, one parquet per episode and one JPEG per
frame and camera setting. `read_lerobot_vln` turns a root into `VLNEpisode` records: instructions,
per-frame decision targets, frame paths and camera poses. Every defect is reported as a `DataError`
that names the file and the episode and goes through an `ErrorPolicy` (raise, or skip and count).

Speed matters because InternData-N1 has thousands of short episodes per scene: each parquet is
opened once and only the needed columns are read, and frame existence is checked with one
``os.listdir`` per frame directory (shared by all episodes of a chunk) instead of a stat per frame.

Parsing of the ``meta/`` files lives in `vlmtrain.data.formats.lerobot_meta`; its public constants
and `rgb_video_key` are re-exported here. This module reads the parquets and frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.lerobot_meta import (
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_PATH,
    DEFAULT_FRAME_PATH,
    INFO_FILE,
    EpisodeMeta,
    Layout,
    read_episode_metas,
    read_layout,
    read_tasks,
    rgb_video_key,
)
from vlmtrain.data.formats.lerobot_meta import (  # noqa: F401 - re-exported, unused here
    EPISODES_FILE,
    TASKS_FILE,
)

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


def check_actions(actions: np.ndarray, path, record, where, missing_first: str | None) -> None:
    """Raise ``unknown_action`` (naming ``where(i)`` of the first bad entry) unless every action is
    one of ``VALID_ACTIONS``; ``missing_first`` (e.g. ``"row 0"``): the first may be ``NO_ACTION``."""
    bad = ~np.isin(actions, sorted(VALID_ACTIONS))
    if missing_first is not None and len(actions) and actions[0] == NO_ACTION:
        bad[0] = False
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        allowed = f" (-1 is allowed only at {missing_first})" if missing_first is not None else ""
        raise DataError(path, "unknown_action", record,
                        f"{where(i)} {int(actions[i])} is not one of {sorted(VALID_ACTIONS)}{allowed}")


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
    str_paths: bool = False,
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
        str_paths: frame paths as ``str`` instead of ``Path`` (a sample index reads millions; a
            ``Path`` per frame was a third of the reader's time).

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
        layout = read_layout(root, setting)
    except DataError as err:
        # Without info.json nothing in the root can be located: the whole root is skipped.
        policy.handle(err)
        return []
    task_names = read_tasks(root, policy)
    metas = read_episode_metas(root, task_names, policy)
    # Shared across episodes: all episodes of a chunk keep their frames in the same folder.
    listings: dict[str, frozenset[str]] = {}
    episodes: list[VLNEpisode] = []
    for meta in metas:
        try:
            episodes.append(_read_episode(layout, meta, check_frames, listings, str_paths))
        except DataError as err:
            policy.handle(err)
    return episodes


# ---------------------------------------------------------------------------------------------
# episodes


def _read_episode(
    layout: Layout,
    meta: EpisodeMeta,
    check_frames: bool,
    listings: dict[str, frozenset[str]],
    str_paths: bool = False,
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
    check_actions(action, pq_path, index, lambda i: f"row {i}: action", "row 0")

    if "expert_action" in table.column_names:
        expert = _int_column(table, "expert_action", pq_path, index)
        check_actions(expert, pq_path, index, lambda i: f"row {i}: expert_action", None)
        targets = expert.copy()
    else:
        targets = np.empty(n_rows, dtype=np.int64)
        targets[:-1] = action[1:]
    targets[-1] = STOP

    pose_col = table.column(layout.pose_column)
    poses = _pose_array(pose_col, n_rows, pq_path, index, layout.pose_column)
    frame_paths = _frame_paths(layout, chunk, index, n_rows, check_frames, listings, str_paths)

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
            return pf.read(columns=wanted, use_threads=False)  # tiny files: threads only add overhead
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
    layout: Layout,
    chunk: int,
    index: int,
    n_rows: int,
    check_frames: bool,
    listings: dict[str, frozenset[str]],
    str_paths: bool = False,
) -> tuple[Path, ...] | tuple[str, ...]:
    """The T frame files of an episode, checked against cached directory listings."""
    # Strings first, Paths last: pathlib parsing dominated the reader's profile, so each frame
    # folder is parsed once and frames are joined to it as bare names.
    folders: dict[str, tuple[Path, frozenset[str]]] = {}
    paths: list[tuple[Path, str]] = []
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
        paths.append((folder, name))
    if str_paths:  # joined without pathlib
        text = {folder: str(folder) for folder, _ in folders.values()}
        return tuple(f"{text[folder]}{os.sep}{name}" for folder, name in paths)
    return tuple(folder / name for folder, name in paths)


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
