"""InternData-N1 scenes read the InternVLA-N1 way: System-2 conversation samples.

By default (``N1Rules(samples="reference")``) the samples are InternNav's own: the starts, kinds,
answers, prompt and images of ``internvla_n1_reference.py``. ``samples="every_frame"`` is the rule
below, vlmtrain's earlier one.

A dataset name such as ``r2r_125cm_0_30%50`` means corpus ``r2r``, camera height 125 cm, history
camera pitch 0° (setting ``125cm_0deg``: history and current frames), look-down pitch 30°
(setting ``125cm_30deg``: the frame a pixel goal is given in), keep 50 % of the built samples.

Every frame ``t`` of every instruction of an episode gives at most one sample; the user turn shows
the history frames ``history_indices(t, num_history)`` and the current frame. Its kind, first match:

* ``stop``: the target at ``t`` is STOP (the last frame). Answer ``STOP``.
* ``pixel_goal``: the look-down setting exists and ``goal.<look-down setting>[t]`` is a ``[u, v]``
  other than ``[-1, -1]``. Answer ``↓``; a second user turn shows the look-down frame ``t``; its
  answer is ``"u v"`` (integers, rounded from the stored values). This is InternVLA-N1's two-round
  pixel-goal dialogue.
* ``turn``: the target is left/right. Answer: the target's symbol (``←``/``→``) repeated once
  per consecutive identical target from ``t``, at most ``horizon`` times.
* ``action``: the target is forward, no pixel goal. Answer ``↑`` repeated the same way.

``kinds`` selects which kinds are kept; ``("pixel_goal", "turn", "stop")`` is InternNav's own mix
(it drops forward frames without a goal). Without the look-down setting there are no pixel-goal
samples and goal frames fall back to ``turn``/``action``. See ``docs/data_formats.md``.
"""

from __future__ import annotations

import json
import os
from os import PathLike
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlmtrain.data.conversation import ConvSample, ImageRef
from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.internvla_n1_reference import N1Rules, build_reference_samples
from vlmtrain.data.formats.lerobot import (
    ACTION_SYMBOLS,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_PATH,
    STOP,
    VLNEpisode,
    iter_dataset_roots,
    read_lerobot_vln,
    rgb_video_key,
)
from vlmtrain.config_sources import N1DatasetName, parse_dataset_name
from vlmtrain.data.mixture import select_indices
from vlmtrain.data.samples import history_indices

__all__ = [
    "INSTRUCTION_SEP",
    "LOOKDOWN_PROMPT",
    "LOOKDOWN_SYMBOL",
    "N1DatasetName",
    "PROMPT",
    "SAMPLE_KINDS",
    "answer_run",
    "build_episode_samples",
    "parse_dataset_name",
    "read_goals",
    "read_internvla_n1",
    "read_internvla_n1_scene",
]

SAMPLE_KINDS: tuple[str, ...] = ("action", "turn", "stop", "pixel_goal")
LOOKDOWN_SYMBOL = "↓"
# InternData-N1 packs several instructions of one path into tasks[0] with this separator.
INSTRUCTION_SEP = "<INSTRUCTION_SEP>"
PROMPT = (
    "You are a navigation agent. Your task: {instruction} "
    "Output the next move, or look down to give a waypoint, or STOP when done. "
    "{history}Current view: <image>."
)
HISTORY_PROMPT = "Earlier views: {images}. "
LOOKDOWN_PROMPT = "Looking down: <image>. Give the waypoint in this image."
NO_GOAL = (-1.0, -1.0)

def read_internvla_n1(
    path: str | PathLike[str],
    dataset: str | N1DatasetName,
    policy: ErrorPolicy | None = None,
    seed: int = 0,
    num_history: int = 8,
    horizon: int = 4,
    kinds: Sequence[str] = SAMPLE_KINDS,
    check_frames: bool = True,
    rules: N1Rules = N1Rules(),
) -> list[ConvSample]:
    """Build InternVLA-N1 System-2 samples from one scene root or a folder of scene roots.

    Args:
        path: a LeRobot root (one scene) or a folder holding many (walked by `iter_dataset_roots`).
        dataset: the dataset name (``r2r_125cm_0_30%50``) or its parsed form.
        policy: what to do with bad episodes; default raises the first `DataError`.
        seed: seeds the ``%N`` selection (`select_indices`, keyed by the dataset name).
        num_history: history frames per sample (``history_indices``).
        horizon: ``every_frame`` rules: longest run of identical actions in one answer (1: one symbol).
        kinds: ``every_frame`` rules: which sample kinds to keep (see the module docstring).
        check_frames: verify that every frame file exists.
        rules: how samples are built (``N1Rules``; default: the reference's).

    Returns:
        The kept samples, scene by scene, episode by episode, frame by frame.

    Raises:
        DataError: in raise mode, any error of `read_lerobot_vln` for either setting, plus
            ``missing_column`` / ``bad_goal`` / ``length_mismatch`` for the goal column.
        ValueError: a bad dataset name or an unknown kind.
    """
    spec = parse_dataset_name(dataset) if isinstance(dataset, str) else dataset
    unknown = sorted(set(kinds) - set(SAMPLE_KINDS))
    if unknown:
        raise ValueError(f"unknown sample kind(s) {unknown}; known: {list(SAMPLE_KINDS)}")
    policy = policy if policy is not None else ErrorPolicy("raise")
    try:
        roots = iter_dataset_roots(path)
    except FileNotFoundError as exc:
        policy.handle(DataError(path, "missing_file", detail=str(exc)))
        return []
    samples: list[ConvSample] = []
    for root in roots:
        samples.extend(_read_scene(root, spec, policy, num_history, horizon, kinds, check_frames, rules))
    return [samples[i] for i in select_indices(len(samples), spec.percent, seed, spec.name)]


def read_internvla_n1_scene(root: Path, spec: N1DatasetName, policy: ErrorPolicy, num_history: int = 8,
                            rules: N1Rules = N1Rules()) -> list[ConvSample]:
    """Every sample of one scene root, as :func:`read_internvla_n1` reads each root (default horizon and
    kinds, frames checked); the unit a sample index builds in parallel."""
    return _read_scene(Path(root), spec, policy, num_history, 4, SAMPLE_KINDS, True, rules)


class _Collector(ErrorPolicy):
    """Keeps errors instead of raising or counting them, so they can be reported once."""

    def __init__(self) -> None:
        super().__init__("skip")
        self.errors: list[DataError] = []

    def handle(self, err: DataError) -> None:
        self.errors.append(err)


def _read_scene(
    root: Path,
    spec: N1DatasetName,
    policy: ErrorPolicy,
    num_history: int,
    horizon: int,
    kinds: Sequence[str],
    check_frames: bool,
    rules: N1Rules = N1Rules(),
) -> list[ConvSample]:
    """Samples of one scene root."""
    reference = rules.samples == "reference"
    episodes = read_lerobot_vln(root, spec.history_setting, policy, check_frames)
    lookdown: dict[int, VLNEpisode] | None = None
    lookdown_errors: dict[int, DataError] = {}
    chunks_size, data_path = DEFAULT_CHUNKS_SIZE, DEFAULT_DATA_PATH
    has_lookdown = any((root / "videos").glob(f"*/{rgb_video_key(spec.lookdown_setting)}"))
    if episodes and ("pixel_goal" in kinds or reference) and has_lookdown:
        # Both settings share the parquet and meta files, so a defect there would be reported
        # twice; the look-down read reports through a collector and only errors of episodes that
        # the first read accepted reach the policy.
        collector = _Collector()
        lookdown = {
            e.episode_index: e
            for e in read_lerobot_vln(root, spec.lookdown_setting, collector, check_frames)
        }
        lookdown_errors = {e.record: e for e in collector.errors if isinstance(e.record, int)}
        chunks_size, data_path = _data_layout(root)
    samples: list[ConvSample] = []
    for episode in episodes:
        index = episode.episode_index
        lookdown_frames: tuple[Path, ...] | None = None
        goals: np.ndarray | None = None
        goal_ids: np.ndarray | None = None
        if lookdown is not None:
            if index not in lookdown:
                policy.handle(
                    lookdown_errors.get(index)
                    or DataError(root, "missing_setting", index, f"no {spec.lookdown_setting} data")
                )
                continue
            pq_path = root / data_path.format(
                episode_chunk=index // chunks_size, episode_index=index
            )
            try:
                goals = read_goals(pq_path, index, episode.length, f"goal.{spec.lookdown_setting}")
                if reference:
                    goal_ids = read_goal_frame_ids(pq_path, index, episode.length,
                                                   f"relative_goal_frame_id.{spec.lookdown_setting}")
            except DataError as err:
                policy.handle(err)
                continue
            lookdown_frames = lookdown[index].frame_paths
        if reference:
            samples.extend(build_reference_samples(
                episode.targets, split_instructions(episode.instructions), episode.frame_paths, spec.name,
                f"{root.name}/episode {index}", rules, num_history, lookdown_frames, goals, goal_ids, PROMPT))
            continue
        samples.extend(
            build_episode_samples(
                episode, spec.name, f"{root.name}/episode {index}", num_history, horizon,
                lookdown_frames, goals, kinds,
            )
        )
    return samples


def _data_layout(root: Path) -> tuple[int, str]:
    """``(chunks_size, data_path template)`` of a root (its info.json was already validated)."""
    info = json.loads((root / "meta" / "info.json").read_text(encoding="utf-8"))
    chunks_size = int(info.get("chunks_size", DEFAULT_CHUNKS_SIZE))
    return chunks_size, info.get("data_path") or DEFAULT_DATA_PATH


def _episode_column(pq_path: Path, index: int, column: str, why: str) -> pa.Array:
    """One column of an episode parquet; DataError ``missing_file`` / ``bad_parquet`` / ``missing_column``."""
    try:
        pf = pq.ParquetFile(pq_path)
    except FileNotFoundError:
        raise DataError(pq_path, "missing_file", index, "episode parquet not found")
    except (OSError, pa.ArrowException) as exc:
        raise DataError(pq_path, "bad_parquet", index, f"cannot open parquet: {exc}")
    with pf:
        names = pf.schema_arrow.names
        if column not in names:
            raise DataError(pq_path, "missing_column", index,
                            f"missing column {column} ({why}); present: {', '.join(names)}")
        return pf.read(columns=[column]).column(column).combine_chunks()


def read_goals(pq_path: str | PathLike[str], index: int, length: int, column: str) -> np.ndarray:
    """Pixel goals of one episode as float64 ``(T, 2)``; ``[-1, -1]`` means no goal at that frame.

    Raises:
        DataError: ``missing_column`` (column absent), ``length_mismatch`` (row count),
            ``bad_goal`` (not two non-null numbers per row, or negative other than ``[-1, -1]``).
    """
    pq_path = Path(pq_path)
    arr = _episode_column(pq_path, index, column, "needed for pixel goals")
    if len(arr) != length:
        raise DataError(
            pq_path, "length_mismatch", index, f"{column} has {len(arr)} rows, want {length}"
        )
    t = arr.type
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if not is_list or arr.null_count:
        raise DataError(
            pq_path, "bad_goal", index, f"{column} must be a non-null list per row, got {t}"
        )
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    values = arr.flatten()
    if (lengths != 2).any() or values.null_count or not (
        pa.types.is_floating(values.type) or pa.types.is_integer(values.type)
    ):
        raise DataError(
            pq_path, "bad_goal", index, f"{column} must hold two numbers [u, v] per row"
        )
    goals = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64).reshape(length, 2)
    none = (goals == NO_GOAL).all(axis=1)
    bad = ~none & ~(np.isfinite(goals).all(axis=1) & (goals >= 0).all(axis=1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            pq_path, "bad_goal", index,
            f"row {row}: {column} = {goals[row].tolist()} is neither [-1, -1] nor a pixel",
        )
    return goals


def read_goal_frame_ids(pq_path: str | PathLike[str], index: int, length: int, column: str) -> np.ndarray:
    """``relative_goal_frame_id.<setting>`` of one episode as int64 ``(T,)`` (-1: no goal): one integer
    per row, or a one-element list (both occur in InternData-N1 releases).

    Raises:
        DataError: ``missing_column``, ``length_mismatch``, ``bad_goal`` (not one integer per row).
    """
    pq_path = Path(pq_path)
    arr = _episode_column(pq_path, index, column, "the reference rules need it for the look-down setting")
    if len(arr) != length:
        raise DataError(pq_path, "length_mismatch", index, f"{column} has {len(arr)} rows, want {length}")
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        if (pc.list_value_length(arr).to_numpy(zero_copy_only=False) != 1).any():
            raise DataError(pq_path, "bad_goal", index, f"{column} must hold one integer per row")
        arr = arr.flatten()
    if arr.null_count or not pa.types.is_integer(arr.type):
        raise DataError(pq_path, "bad_goal", index, f"{column} must hold one integer per row, got {arr.type}")
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64)


def split_instructions(texts: Sequence[str]) -> list[str]:
    """An episode's instructions: every ``tasks`` entry split on ``<INSTRUCTION_SEP>``, blanks dropped."""
    return [part.strip() for text in texts for part in text.split(INSTRUCTION_SEP) if part.strip()]


def answer_run(targets: np.ndarray, t: int, horizon: int) -> str:
    """The target's symbol at ``t``, repeated for each consecutive identical target, ≤ `horizon`.

    STOP is never repeated: it ends the episode.
    """
    action = int(targets[t])
    n = 1
    if action != STOP:
        while n < horizon and t + n < len(targets) and int(targets[t + n]) == action:
            n += 1
    return ACTION_SYMBOLS[action] * n


def build_episode_samples(
    episode: VLNEpisode,
    source: str,
    record_prefix: str,
    num_history: int = 8,
    horizon: int = 4,
    lookdown_frames: Sequence[str | PathLike[str]] | None = None,
    goals: np.ndarray | None = None,
    kinds: Sequence[str] = SAMPLE_KINDS,
) -> list[ConvSample]:
    """Samples of one episode (any `VLNEpisode`: InternData-N1, StreamVLN, GridNav).

    Without `lookdown_frames` and `goals` only ``action``, ``turn`` and ``stop`` samples exist.
    Records are ``"{record_prefix} t={t}"`` (plus ``" instruction {k}"`` when there are several).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    frames = [os.path.abspath(p) for p in episode.frame_paths]
    down = [os.path.abspath(p) for p in lookdown_frames] if lookdown_frames is not None else None
    instructions = split_instructions(episode.instructions)
    wanted = set(kinds)
    samples: list[ConvSample] = []
    for k, instruction in enumerate(instructions):
        suffix = f" instruction {k}" if len(instructions) > 1 else ""
        for t in range(episode.length):
            target = int(episode.targets[t])
            has_goal = down is not None and goals is not None and tuple(goals[t]) != NO_GOAL
            if target == STOP:
                kind = "stop"
            elif has_goal:
                kind = "pixel_goal"
            else:
                kind = "turn" if target in (2, 3) else "action"
            if kind not in wanted:
                continue
            history = history_indices(t, num_history)
            images = [frames[h] for h in history] + [frames[t]]
            hist_text = HISTORY_PROMPT.format(images="<image>" * len(history)) if history else ""
            turns = [("user", PROMPT.format(instruction=instruction, history=hist_text))]
            if kind == "pixel_goal" and down is not None and goals is not None:
                u, v = (int(round(x)) for x in goals[t])
                turns += [
                    ("assistant", LOOKDOWN_SYMBOL),
                    ("user", LOOKDOWN_PROMPT),
                    ("assistant", f"{u} {v}"),
                ]
                images.append(down[t])
            else:
                turns.append(("assistant", answer_run(episode.targets, t, horizon)))
            samples.append(
                ConvSample(
                    source=source,
                    record=f"{record_prefix} t={t}{suffix}",
                    turns=tuple(turns),
                    images=tuple(ImageRef(p) for p in images),
                )
            )
    return samples
