"""Write GridNav demonstrations as an InternData-N1-style LeRobot v2.1 dataset.

Layout and columns follow ``docs/data_formats.md``. The dataset is written into a hidden temp dir
next to ``out_dir`` and renamed at the end, so a killed run never leaves a complete-looking half
dataset. Rendering and file writing run in a process pool over episode ranges.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .camera import camera_basis, pixel_goal, render_pitched
from .expert import EXPERT_VERSION, Demo, demonstrate, make_episode
from .render import encode_jpeg, render
from .world import ACTION_NAMES, MAX_STEPS, EpisodeSpec, Pose, episode_rng

CODEBASE_VERSION = "v2.1"
CHUNKS_SIZE = 1000
FPS = 1
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = ("videos/chunk-{episode_chunk:03d}/{video_key}/"
              "episode_{episode_index:06d}_{frame_index}.jpg")
_SETTING_RE = re.compile(r"^(\d+)cm_(-?\d+)deg$")


def parse_setting(setting: str) -> tuple[float, float]:
    """``"125cm_0deg"`` -> (camera height in metres, pitch in degrees)."""
    m = _SETTING_RE.match(setting)
    if not m:
        raise ValueError(f"setting must look like '125cm_0deg', got {setting!r}")
    return int(m.group(1)) / 100.0, float(m.group(2))


def camera_to_world(pose: Pose, camera_height: float, pitch_deg: float = 0.0) -> list[list[float]]:
    """4x4 camera-to-world matrix; world z up, camera axes OpenCV-style (x right, y down,
    z forward), pitched down by ``pitch_deg``."""
    forward, right, down = camera_basis(pose, pitch_deg)
    # Columns: camera x (right), y (down), z (forward) in world coordinates, then the position.
    # + 0.0 turns the -0.0 of a zero pitch into 0.0, so level cameras are written as they always were
    return [[float(right[i]) + 0.0, float(down[i]) + 0.0, float(forward[i]) + 0.0, p]
            for i, p in enumerate((pose.x, pose.y, camera_height))] + [[0.0, 0.0, 0.0, 1.0]]


def lookdown_setting(setting: str, pitch_deg: float) -> str:
    """The look-down setting of history setting ``setting`` at ``pitch_deg``: ``125cm_30deg``."""
    height, _ = parse_setting(setting)
    return f"{round(height * 100)}cm_{pitch_deg:g}deg"


@dataclass(frozen=True)
class _Job:
    """One episode to write (demo computed in the parent so global indices are known)."""

    episode_index: int
    layout_spec: EpisodeSpec
    demo: Demo
    task_index: int
    global_offset: int


def _setting_fields(setting: str) -> list[tuple[str, pa.DataType]]:
    return [(f"pose.{setting}", pa.list_(pa.list_(pa.float64()))), (f"goal.{setting}", pa.list_(pa.float64())),
            (f"relative_goal_frame_id.{setting}", pa.int64())]


def _schema(setting: str, lookdown: str = "") -> pa.Schema:
    return pa.schema([
        ("action", pa.int64()),
        *_setting_fields(setting),
        *(_setting_fields(lookdown) if lookdown else []),
        ("timestamp", pa.float32()),
        ("frame_index", pa.int64()),
        ("episode_index", pa.int64()),
        ("index", pa.int64()),
        ("task_index", pa.int64()),
        ("expert_action", pa.int64()),
    ])


def _write_jobs(root: str, jobs: list[_Job], setting: str, image_size: int,
                jpeg_quality: int, lookdown_pitch: float = 0.0) -> None:
    """Worker: render each frame to JPEG and write each episode's parquet (with ``lookdown_pitch``
    > 0 also the look-down frames and their pixel goals)."""
    cam_h, _ = parse_setting(setting)
    down = lookdown_setting(setting, lookdown_pitch) if lookdown_pitch else ""
    schema = _schema(setting, down)
    for job in jobs:
        e = job.episode_index
        chunk = e // CHUNKS_SIZE
        n = len(job.demo)
        layout = job.layout_spec.layout
        poses = job.demo.poses
        vid_dir = Path(root) / f"videos/chunk-{chunk:03d}/observation.images.rgb.{setting}"
        for t, pose in enumerate(poses):
            img = render(layout, pose, image_size, camera_height=cam_h)
            (vid_dir / f"episode_{e:06d}_{t}.jpg").write_bytes(encode_jpeg(img, jpeg_quality))
        columns = [
            pa.array([camera_to_world(p, cam_h) for p in poses], pa.list_(pa.list_(pa.float64()))),
            pa.array([[-1.0, -1.0]] * n, pa.list_(pa.float64())),
            pa.array([-1] * n, pa.int64()),
        ]
        if down:
            down_dir = Path(root) / f"videos/chunk-{chunk:03d}/observation.images.rgb.{down}"
            for t, pose in enumerate(poses):
                img = render_pitched(layout, pose, image_size, lookdown_pitch, camera_height=cam_h)
                (down_dir / f"episode_{e:06d}_{t}.jpg").write_bytes(encode_jpeg(img, jpeg_quality))
            goals = [pixel_goal(layout, poses, t, image_size, lookdown_pitch, camera_height=cam_h) for t in range(n)]
            columns += [
                pa.array([camera_to_world(p, cam_h, lookdown_pitch) for p in poses], pa.list_(pa.list_(pa.float64()))),
                pa.array([list(uv) for _, uv in goals], pa.list_(pa.float64())),
                pa.array([gid for gid, _ in goals], pa.int64()),
            ]
        # Action that led into frame t: -1 at t=0, then the action executed at frame t-1.
        action = [-1] + job.demo.executed[:-1]
        table = pa.Table.from_arrays([
            pa.array(action, pa.int64()),
            *columns,
            pa.array([t / FPS for t in range(n)], pa.float32()),
            pa.array(range(n), pa.int64()),
            pa.array([e] * n, pa.int64()),
            pa.array(range(job.global_offset, job.global_offset + n), pa.int64()),
            pa.array([job.task_index] * n, pa.int64()),
            pa.array(job.demo.labels, pa.int64()),
        ], schema=schema)
        pq.write_table(table, Path(root) / DATA_PATH.format(episode_chunk=chunk, episode_index=e))


def _write_jobs_star(args: tuple[Any, ...]) -> None:
    _write_jobs(*args)


def _camera_features(setting: str, image_size: int, jpeg_quality: int) -> dict[str, Any]:
    return {
        f"observation.images.rgb.{setting}": {
            "dtype": "image", "shape": [image_size, image_size, 3],
            "names": ["height", "width", "channel"],
            "info": {"format": "jpeg", "quality": jpeg_quality, "path": "video_path"},
        },
        f"pose.{setting}": {"dtype": "float64", "shape": [4, 4], "names": None,
                            "info": {"note": "camera-to-world, world z up, camera x right "
                                             "y down z forward"}},
        f"goal.{setting}": {"dtype": "float64", "shape": [2], "names": ["u", "v"],
                            "info": {"note": "pixel (column, row) of the farthest later position the "
                                             "camera sees; [-1, -1]: none"}},
        f"relative_goal_frame_id.{setting}": {"dtype": "int64", "shape": [1], "names": None,
                                              "info": {"note": "frames from this one to the goal's; -1: none"}},
    }


def _features(setting: str, image_size: int, jpeg_quality: int, lookdown: str = "") -> dict[str, Any]:
    scalar = {"shape": [1], "names": None}
    return {
        **_camera_features(setting, image_size, jpeg_quality),
        **(_camera_features(lookdown, image_size, jpeg_quality) if lookdown else {}),
        "action": {"dtype": "int64", **scalar,
                   "info": {"labels": {str(k): v for k, v in ACTION_NAMES.items()},
                            "note": "action that led into this frame; -1 at frame 0"}},
        "timestamp": {"dtype": "float32", **scalar},
        "frame_index": {"dtype": "int64", **scalar},
        "episode_index": {"dtype": "int64", **scalar},
        "index": {"dtype": "int64", **scalar},
        "task_index": {"dtype": "int64", **scalar},
        "expert_action": {"dtype": "int64", **scalar,
                          "info": {"note": "expert label at this frame (decision target)"}},
    }


def _dump_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def expert_version(root: str | os.PathLike[str]) -> int | None:
    """The expert version a generated GridNav dataset at ``root`` was labelled with (1 for data
    written before versions were recorded); None when ``root`` holds no generated GridNav data."""
    path = Path(root) / "meta" / "gridnav.json"
    if not path.is_file():
        return None
    return int(json.loads(path.read_text()).get("expert_version", 1))


def write_dataset(out_dir: str | os.PathLike[str], episodes: int, seed: int,
                  split: str = "train", image_size: int = 64, noise_p: float = 0.25,
                  jpeg_quality: int = 90, setting: str = "125cm_0deg",
                  workers: int | None = None, overwrite: bool = False, detour_p: float = 0.0,
                  lookdown_pitch: float = 0.0) -> Path:
    """Generate ``episodes`` noisy demonstrations of ``split`` and write them as a LeRobot v2.1
    dataset at ``out_dir`` (atomically: temp dir + rename). ``noise_p`` and ``detour_p`` are the
    DAgger-like perturbations of :func:`demonstrate`. ``workers`` defaults to the CPU count
    (1 = in-process). ``lookdown_pitch`` > 0 also writes InternData-N1's look-down setting
    (``125cm_30deg`` for 30): its frames, camera poses and pixel goals (``camera.pixel_goal``), so an
    ``internvla_n1`` source named ``gridnav_125cm_0_30`` reads it. Returns the dataset root."""
    out = Path(out_dir)
    cam_h, pitch = parse_setting(setting)
    if pitch != 0:
        raise ValueError(f"setting {setting}: GridNav's history camera has zero pitch (look down with lookdown_pitch)")
    if not 0 <= lookdown_pitch < 90:
        raise ValueError(f"lookdown_pitch={lookdown_pitch}: must be in [0, 90) degrees")
    down = lookdown_setting(setting, lookdown_pitch) if lookdown_pitch else ""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        # Specs and demos are cheap (no rendering): compute them here so task and global frame
        # indices are known before the workers write.
        specs = [make_episode(seed, split, i) for i in range(episodes)]
        demos = [demonstrate(s, episode_rng(seed, split, i, stream=1), noise_p, detour_p=detour_p)
                 for i, s in enumerate(specs)]
        tasks: dict[str, int] = {}
        for s in specs:
            tasks.setdefault(s.instruction, len(tasks))
        jobs: list[_Job] = []
        offset = 0
        for i, (s, d) in enumerate(zip(specs, demos)):
            jobs.append(_Job(i, s, d, tasks[s.instruction], offset))
            offset += len(d)
        total_frames = offset

        (tmp / "meta").mkdir(parents=True)
        for c in range((episodes + CHUNKS_SIZE - 1) // CHUNKS_SIZE):
            (tmp / f"data/chunk-{c:03d}").mkdir(parents=True)
            for cam in (setting, down) if down else (setting,):
                (tmp / f"videos/chunk-{c:03d}/observation.images.rgb.{cam}").mkdir(parents=True)

        n_workers = workers if workers is not None else (os.cpu_count() or 1)
        n_workers = max(1, min(n_workers, episodes))
        if n_workers == 1:
            _write_jobs(str(tmp), jobs, setting, image_size, jpeg_quality, lookdown_pitch)
        else:
            # Contiguous ranges, a few per worker for load balance. "spawn" so a caller that
            # already started threads (torch, tokenizers) is not forked mid-state.
            parts = n_workers * 4
            bounds = np.linspace(0, episodes, parts + 1).astype(int)
            args = [(str(tmp), jobs[a:b], setting, image_size, jpeg_quality, lookdown_pitch)
                    for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
            with mp.get_context("spawn").Pool(n_workers) as pool:
                for _ in pool.imap_unordered(_write_jobs_star, args):
                    pass

        meta = tmp / "meta"
        _dump_jsonl(meta / "episodes.jsonl", [
            {"episode_index": i, "tasks": [s.instruction], "length": len(d)}
            for i, (s, d) in enumerate(zip(specs, demos))
        ])
        _dump_jsonl(meta / "tasks.jsonl", [{"task_index": k, "task": t} for t, k in tasks.items()])
        _dump_jsonl(meta / "gridnav_episodes.jsonl", [
            {"episode_index": i, "spec": s.to_json()} for i, s in enumerate(specs)
        ])
        (meta / "gridnav.json").write_text(json.dumps({
            "generator": "vlmtrain.envs.gridnav", "episodes": episodes, "seed": seed,
            "split": split, "image_size": image_size, "noise_p": noise_p, "detour_p": detour_p,
            "jpeg_quality": jpeg_quality, "setting": setting, "camera_height": cam_h,
            "hfov_deg": 90.0, "max_steps": MAX_STEPS, "expert_version": EXPERT_VERSION,
            **({"lookdown_setting": down, "lookdown_pitch": lookdown_pitch} if down else {}),
        }, indent=2))
        (meta / "info.json").write_text(json.dumps({
            "codebase_version": CODEBASE_VERSION,
            "robot_type": "gridnav",
            "total_episodes": episodes,
            "total_frames": total_frames,
            "total_tasks": len(tasks),
            "total_videos": 0,
            "total_chunks": (episodes + CHUNKS_SIZE - 1) // CHUNKS_SIZE,
            "chunks_size": CHUNKS_SIZE,
            "fps": FPS,
            "splits": {split: f"0:{episodes}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH,
            "features": _features(setting, image_size, jpeg_quality, down),
        }, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
