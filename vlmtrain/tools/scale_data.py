"""A large InternData-N1-layout scene set written cheaply, for start-up and index benchmarks.

Real mixes (R2R + RxR + ScaleVLN) reach tens of millions of decision samples; what start-up costs
depends on the number of scenes, episodes, frames and parquet files, not on what the frames show.
So every scene gets a handful of tiny distinct JPEGs and each frame path of each episode is a hard
link to one of them (one directory entry per frame, no extra data blocks); everything else is what
the LeRobot VLN reader reads for real: ``meta/info.json``, ``meta/episodes.jsonl``,
``meta/tasks.jsonl``, one parquet per episode (``action``, ``expert_action``, ``frame_index``,
``pose.<setting>``), one frame file per frame. Episode lengths and instructions vary per episode.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlmtrain.data.formats.lerobot_meta import DEFAULT_CHUNKS_SIZE, DEFAULT_DATA_PATH, DEFAULT_FRAME_PATH

SETTING = "125cm_0deg"
WORDS = ("walk", "past", "the", "sofa", "turn", "left", "right", "at", "kitchen", "stop", "near", "door",
         "go", "up", "stairs", "wait", "by", "table", "exit", "bedroom", "hallway", "into", "plant", "chair")
POOL = 8  # distinct frame files per scene


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _write_scene(args: tuple[str, int, int, int, int]) -> int:
    """Worker: one scene root with ``episodes`` episodes; returns its frame count."""
    root_s, scene, episodes, seed, image_size = args
    root = Path(root_s)
    rng = np.random.default_rng([seed, scene])
    video_key = f"observation.images.rgb.{SETTING}"
    pool_dir = root / "pool"
    pool_dir.mkdir(parents=True)
    pool = []
    for i in range(POOL):
        p = pool_dir / f"{i}.jpg"
        p.write_bytes(_jpeg(rng, image_size))
        pool.append(str(p))
    metas, frames = [], 0
    pose = pa.array([list(np.eye(4).reshape(-1))], pa.list_(pa.float64(), 16))
    for e in range(episodes):
        n = int(rng.integers(40, 91))  # R2R-like: 10-22 m at 0.25 m steps plus turns
        chunk = e // DEFAULT_CHUNKS_SIZE
        pq_path = root / DEFAULT_DATA_PATH.format(episode_chunk=chunk, episode_index=e)
        frame0 = root / DEFAULT_FRAME_PATH.format(episode_chunk=chunk, episode_index=e, video_key=video_key,
                                                  frame_index=0)
        if e % DEFAULT_CHUNKS_SIZE == 0:
            pq_path.parent.mkdir(parents=True, exist_ok=True)
            frame0.parent.mkdir(parents=True, exist_ok=True)
        expert = rng.integers(1, 4, n)
        expert[-1] = 0
        action = np.r_[-1, expert[:-1]]
        table = pa.table({"action": pa.array(action, pa.int64()), "expert_action": pa.array(expert, pa.int64()),
                          "frame_index": pa.array(np.arange(n), pa.int64()),
                          f"pose.{SETTING}": pa.repeat(pose[0], n) if hasattr(pa, "repeat") else
                          pa.array([pose[0].as_py()] * n, pa.list_(pa.float64(), 16))})
        pq.write_table(table, pq_path)
        folder = frame0.parent
        for t in range(n):
            os.link(pool[(e + t) % POOL], folder / f"episode_{e:06d}_{t}.jpg")
        words = rng.choice(WORDS, size=int(rng.integers(8, 20)))
        metas.append({"episode_index": e, "length": n, "tasks": [" ".join(words).capitalize() + "."]})
        frames += n
    (root / "meta").mkdir()
    (root / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v2.1", "chunks_size": DEFAULT_CHUNKS_SIZE,
                                                         "fps": 1, "total_episodes": episodes, "total_frames": frames}))
    (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas))
    (root / "meta" / "tasks.jsonl").write_text("")
    return frames


def write_scale_scenes(out: str | os.PathLike[str], samples: int, episodes_per_scene: int = 200, seed: int = 0,
                       image_size: int = 16, workers: int = 2) -> dict:
    """Write scene roots under ``out`` until they hold at least ``samples`` decision samples (one per
    frame); returns ``{"scenes", "episodes", "frames"}``. ``out`` must not exist (written to a
    temporary folder, then renamed, so a killed write leaves no half scene set)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    mean_len = 65.5  # of rng.integers(40, 91)
    scenes = max(1, int(np.ceil(samples / (mean_len * episodes_per_scene))))
    jobs = [(str(tmp / f"scene_{s:05d}"), s, episodes_per_scene, seed, image_size) for s in range(scenes)]
    tmp.mkdir(parents=True)
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            counts = pool.map(_write_scene, jobs, chunksize=1)
    else:
        counts = [_write_scene(j) for j in jobs]
    os.rename(tmp, out)
    return {"scenes": scenes, "episodes": scenes * episodes_per_scene, "frames": int(sum(counts))}
