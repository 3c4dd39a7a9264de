"""InternVLA-N1 System-2 samples under the default rules, InternNav's reference ones
(data/formats/internvla_n1_reference.py): the list of (kind, episode, instruction, start, answer,
images) of scenes written here, in both InternData-N1 parquet variants (21 columns with integer goal
frame ids, 56 columns with one-element lists), for four look-down settings; the per-kind counts of
the issue's 3-episode, 107-frame scene; the prompt byte for byte; every knob.

Expectations are written out by hand (counts, prompt text) or re-derived here from the rules as the
issue states them, never by calling the code under test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.internvla_n1 import read_internvla_n1
from vlmtrain.data.formats.internvla_n1_reference import CONJUNCTIONS, N1Rules, conjunction, sample_kind

SETTINGS = ("125cm_0deg", "125cm_30deg", "125cm_45deg", "60cm_15deg", "60cm_30deg")
# dataset name -> (history setting, look-down setting)
NAMES = {"r2r_125cm_0_30": ("125cm_0deg", "125cm_30deg"), "r2r_125cm_0_45": ("125cm_0deg", "125cm_45deg"),
         "r2r_60cm_15_15": ("60cm_15deg", "60cm_15deg"), "r2r_60cm_30_30": ("60cm_30deg", "60cm_30deg")}
LENGTHS = (35, 36, 36)  # 107 frames; starts 0, 4, ..., 32 in each: 27 candidates
SAMPLE_STEP, FUTURE, STOP_REPEAT, HISTORY = 4, 4, 5, 8


def _targets(e: int, n: int) -> list[int]:
    """Decision targets: forward everywhere, a turn run at frame 8, STOP at the end."""
    t = [1] * n
    t[8:11] = {0: [2, 2, 1], 1: [2, 3, 1], 2: [3, 3, 3]}[e]
    if e == 2:
        t[11:14] = [3, 3, 1]  # a run of five turns: the answer stops at num_future_steps = 4
    t[-1] = 0
    return t


# setting -> {(episode, start): relative goal frame id}; every other start has goal frame id 5.
GOAL_IDS = {
    "125cm_30deg": {(0, 0): -1, (1, 0): -1, (2, 0): 2, (0, 8): -1, (1, 8): -1, (2, 8): -1},
    "125cm_45deg": {(0, 0): -1, (1, 0): 0, (2, 0): 3, (0, 8): 4, (1, 8): 4, (2, 8): 4},
    "60cm_15deg": {(0, 4): -1, (1, 4): 1, (2, 4): -1, (0, 8): -1, (1, 8): -1, (2, 8): -1},
    "60cm_30deg": {(0, 0): -1, (1, 0): -1, (2, 12): 2, (0, 8): -1, (1, 8): 7, (2, 8): 7},
}
# The counts for a 3-episode, 107-frame scene: (pixel-goal, turn, STOP copies).
COUNTS = {"125cm_30deg": (21, 3, 15), "125cm_45deg": (25, 0, 15), "60cm_15deg": (21, 3, 15), "60cm_30deg": (23, 1, 15)}
TASKS = ("Walk past the sofa and stop at the door.", "Turn left into the kitchen.",
         "Go up the stairs.<INSTRUCTION_SEP>Climb the stairs and wait.")


def _goal_ids(setting: str, e: int, n: int) -> list[int]:
    ids = [-1] * n
    for s in range(0, n - 1, SAMPLE_STEP):
        ids[s] = GOAL_IDS[setting].get((e, s), 5)
    return ids


def frame(root: Path, setting: str, e: int, t: int) -> Path:
    return root / "videos" / "chunk-000" / f"observation.images.rgb.{setting}" / f"episode_{e:06d}_{t}.jpg"


def write_scene(root: Path, wide: bool = False, tasks=TASKS[:2] + ("Go up the stairs.",)) -> Path:
    """Three episodes in InternData-N1's layout: 21 parquet columns (``wide``: 56, goal frame ids as
    one-element lists)."""
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v2.1", "chunks_size": 1000,
                                                         "fps": 10, "total_episodes": 3}))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e, "tasks": [tasks[e]], "length": n}) + "\n" for e, n in enumerate(LENGTHS)))
    start = 0
    for e, n in enumerate(LENGTHS):
        cols: dict = {"action": pa.array([-1] + _targets(e, n)[:-1], pa.int32())}
        for s in SETTINGS:
            cols[f"pose.{s}"] = [np.eye(4).tolist()] * n
            cols[f"goal.{s}"] = pa.array([[100 + t, 200 + e] for t in range(n)], pa.list_(pa.int32(), 2))
            ids = _goal_ids(s, e, n) if s in GOAL_IDS else [-1] * n
            cols[f"relative_goal_frame_id.{s}"] = (pa.array([[i] for i in ids], pa.list_(pa.int32(), 1)) if wide
                                                   else pa.array(ids, pa.int32()))
        cols.update({"timestamp": pa.array([t / 10 for t in range(n)], pa.float32()),
                     "frame_index": pa.array(range(n), pa.int64()), "episode_index": pa.array([e] * n, pa.int64()),
                     "index": pa.array(range(start, start + n), pa.int64()),
                     "task_index": pa.array([e] * n, pa.int64())})
        if wide:
            for i in range(35):
                cols[f"observation.extra_{i}"] = pa.array([float(i)] * n, pa.float32())
        start += n
        table = pa.table(cols)
        assert table.num_columns == (56 if wide else 21)
        path = root / "data" / "chunk-000" / f"episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        for s in SETTINGS:
            for t in range(n):
                f = frame(root, s, e, t)
                f.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4), (e * 60, t * 2, SETTINGS.index(s) * 40)).save(f, "JPEG")
    return root


def expected(root: Path, history: str, down: str, instructions=None, pixel_goal_only=False) -> list[tuple]:
    """(kind, episode, instruction, start, answer(s), image paths) by the rules as the issue states them."""
    out = []
    for e, n in enumerate(LENGTHS):
        targets = _targets(e, n)
        ids = _goal_ids(down, e, n) if down in GOAL_IDS else [-1] * n
        for k, instruction in enumerate((instructions or {}).get(e, [TASKS[e]])):
            for s in range(0, n + 1, SAMPLE_STEP):
                if s in (n, n - 1):
                    continue
                hist = sorted(set(np.linspace(0, s - 1, HISTORY).astype(int).tolist())) if s else []
                images = [frame(root, history, e, h) for h in hist] + [frame(root, history, e, s)]
                if ids[s] == -1:
                    if targets[s] == 1 or pixel_goal_only:
                        continue
                    answer = ""
                    for a in targets[s:]:
                        if a == 1 or len(answer) == FUTURE:
                            break
                        answer += {0: "STOP", 2: "←", 3: "→"}[a]
                    out.append(("turn", e, k, s, (answer,), images))
                elif ids[s] >= 3:
                    out.append(("pixel_goal", e, k, s, ("↓", f"{100 + s} {200 + e}"),
                                images + [frame(root, down, e, s)]))
            if not pixel_goal_only:
                hist = sorted(set(np.linspace(0, n - 2, HISTORY).astype(int).tolist()))
                stop_images = [frame(root, history, e, h) for h in hist] + [frame(root, history, e, n - 1)]
                out += [("stop", e, k, n - 1, ("STOP",), stop_images)] * STOP_REPEAT
    return out


def _where(record: str) -> tuple[int, int, int]:
    """(episode, start, instruction) of a record such as ``scene/episode 1 s=12 instruction 1 stop 3``."""
    e = int(re.search(r"episode (\d+)", record).group(1))
    s = int(re.search(r"s=(\d+)", record).group(1))
    k = re.search(r"instruction (\d+)", record)
    return e, s, int(k.group(1)) if k else 0


def got(samples) -> list[tuple]:
    """The same tuple of each sample read (episode, instruction and start from its record)."""
    out = []
    for smp in samples:
        e, s, k = _where(smp.record)
        answers = tuple(text for role, text in smp.turns if role == "assistant")
        out.append((sample_kind(smp), e, k, s, answers, [Path(i.path) for i in smp.images]))
    return out


@pytest.mark.parametrize("wide", [False, True], ids=["21_columns", "56_columns"])
@pytest.mark.parametrize("name", list(NAMES))
def test_samples_follow_the_reference_rules(tmp_path, name, wide):
    root = write_scene(tmp_path / "scene", wide=wide)
    samples = read_internvla_n1(root, name)
    history, down = NAMES[name]
    assert got(samples) == expected(root, history, down)
    kinds = [sample_kind(s) for s in samples]
    assert (kinds.count("pixel_goal"), kinds.count("turn"), kinds.count("stop")) == COUNTS[down]
    assert len(samples) in (39, 40)  # the 39-40 samples per camera setting


def test_the_turn_answer_stops_at_num_future_steps_and_the_first_forward(tmp_path):
    root = write_scene(tmp_path / "scene")
    turns = {(e, s): a for kind, e, _, s, a, _ in got(read_internvla_n1(root, "r2r_125cm_0_30")) if kind == "turn"}
    assert turns == {(0, 8): ("←←",), (1, 8): ("←→",), (2, 8): ("→→→→",)}


def test_an_instruction_without_a_final_period_gets_one():
    """GridNav's instructions end without a period; InternData-N1's with one, kept as stored."""
    from vlmtrain.data.formats.internvla_n1_reference import reference_user_text

    tail = (" Where should you go next to stay on track? Please output the next waypoint's coordinates in the image. "
            "Please output STOP when you have successfully completed the task. there is <image>.")
    head = "You are an autonomous navigation assistant. Your task is to "
    assert reference_user_text("walk to the red box", 0, "there is ") == head + "walk to the red box." + tail
    assert reference_user_text("Go up the stairs.", 0, "there is ") == head + "Go up the stairs." + tail
    assert reference_user_text("Is it there?", 0, "there is ") == head + "Is it there?" + tail


def test_prompt_is_the_reference_template_byte_for_byte(tmp_path):
    root = write_scene(tmp_path / "scene")
    samples = read_internvla_n1(root, "r2r_125cm_0_30")
    by_start = {_where(s.record)[:2]: s for s in samples}
    first = next(s for s in read_internvla_n1(root, "r2r_125cm_0_45") if _where(s.record)[:2] == (2, 0))
    conj = conjunction(first.record)  # s = 0 (a pixel goal at 125cm 45 deg): no history sentence
    assert conj in CONJUNCTIONS
    assert first.turns[0] == ("system", "You are a helpful assistant.")
    assert first.turns[1] == ("user", "You are an autonomous navigation assistant. Your task is to Go up the stairs. "
                              "Where should you go next to stay on track? Please output the next "
                              "waypoint's coordinates in the image. Please output STOP when you have successfully "
                              f"completed the task. {conj}<image>.")
    later = by_start[(1, 12)]  # 8 history frames of 12: unique(linspace(0, 11, 8)) = 8 frames
    conj = conjunction(later.record)
    assert later.turns[1][1] == (
        "You are an autonomous navigation assistant. Your task is to Turn left into the kitchen. Where should you go "
        "next to stay on track? Please output the next waypoint's coordinates in the image. Please output STOP when "
        "you have successfully completed the task. These are your historical observations: "
        + "<image>\n" * 8 + f". {conj}<image>.")
    assert later.turns[2:] == (("assistant", "↓"), ("user", f"{conjunction(later.record, 1)}<image>."),
                               ("assistant", "112 201"))
    again = read_internvla_n1(root, "r2r_125cm_0_30")  # seeded per sample: the same on every read
    assert [s.turns for s in again] == [s.turns for s in samples]
    used = {conjunction(s.record) for s in samples}
    assert len(used) >= 4  # drawn per sample, not one for all


def test_instructions_are_split_and_each_gets_the_rules(tmp_path):
    root = write_scene(tmp_path / "scene", tasks=TASKS)
    samples = read_internvla_n1(root, "r2r_125cm_0_30")
    two = {2: ["Go up the stairs.", "Climb the stairs and wait."]}
    assert got(samples) == expected(root, "125cm_0deg", "125cm_30deg", instructions=two)
    assert "Climb the stairs and wait. Where" in next(s for s in samples if "instruction 1" in s.record).turns[1][1]


def test_knobs_change_the_list_as_the_rules_say(tmp_path):
    root = write_scene(tmp_path / "scene")
    only = read_internvla_n1(root, "r2r_125cm_0_30", rules=N1Rules(pixel_goal_only=True))
    assert got(only) == expected(root, "125cm_0deg", "125cm_30deg", pixel_goal_only=True)
    assert {sample_kind(s) for s in only} == {"pixel_goal"} and len(only) == 21
    twice = read_internvla_n1(root, "r2r_125cm_0_30", rules=N1Rules(stop_repeat=2))
    assert [sample_kind(s) for s in twice].count("stop") == 6
    step8 = read_internvla_n1(root, "r2r_125cm_0_30", rules=N1Rules(sample_step=8))
    assert {_where(s.record)[1] for s in step8 if sample_kind(s) != "stop"} <= {0, 8, 16, 24, 32}
    short = read_internvla_n1(root, "r2r_125cm_0_30", rules=N1Rules(num_future_steps=1))
    assert {a for kind, *_, a, _ in got(short) if kind == "turn"} == {("←",), ("→",)}
    own = read_internvla_n1(root, "r2r_125cm_0_30", rules=N1Rules(prompt="vlmtrain"))
    assert got(own) == got(read_internvla_n1(root, "r2r_125cm_0_30"))  # same samples, other wording
    assert own[0].turns[1][1].startswith("You are a navigation agent. Your task: Walk past the sofa")


def test_short_episodes_and_a_missing_goal_frame_column(tmp_path):
    root = write_scene(tmp_path / "scene")
    data = root / "data" / "chunk-000" / "episode_000001.parquet"
    table = pq.read_table(data)
    pq.write_table(table.drop(["relative_goal_frame_id.125cm_30deg"]), data)
    with pytest.raises(DataError, match="relative_goal_frame_id.125cm_30deg"):
        read_internvla_n1(root, "r2r_125cm_0_30")
    policy = ErrorPolicy("skip")
    kept = read_internvla_n1(root, "r2r_125cm_0_30", policy)
    assert {_where(s.record)[0] for s in kept} == {0, 2}
    assert policy.summary() == {"missing_column": 1}

    short = tmp_path / "short"
    write_scene(short)
    meta = short / "meta" / "episodes.jsonl"
    lines = [json.loads(x) for x in meta.read_text().splitlines()]
    # episode 0 cut to 3 frames: below the reference's 4, it gives no sample
    lines[0]["length"] = 3
    meta.write_text("".join(json.dumps(x) + "\n" for x in lines))
    t0 = short / "data" / "chunk-000" / "episode_000000.parquet"
    pq.write_table(pq.read_table(t0).slice(0, 3), t0)
    assert {_where(s.record)[0] for s in read_internvla_n1(short, "r2r_125cm_0_30")} == {1, 2}
