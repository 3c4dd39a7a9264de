"""Closed-loop evaluation of InternVLA-N1 System-2 runs on GridNav (train/evaluate_n1.py): GridNav's
geometric System 1 against hand-worked motions, the answers and tokens the decoder may use per
family, and `vlmtrain eval` of a run trained on GridNav's look-down data end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vlmtrain.config import RunConfig, load_config
from vlmtrain.envs.gridnav.generate import write_dataset
from vlmtrain.envs.gridnav.world import FORWARD, LEFT, RIGHT, STOP, Layout, Pose
from vlmtrain.train.evaluate import evaluate_run, format_report
from vlmtrain.train.evaluate_n1 import (
    _is_waypoint_prefix,
    end_of_answer_token,
    first_answers,
    is_n1_run,
    walk_to,
    walk_to_pixel,
    waypoint_tokens,
)
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
from vlmtrain.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
EMPTY = Layout(width=6.0, depth=6.0, objects=(), wall_rgb=(150, 140, 130), floor_rgb=(120, 110, 100))


def test_walk_to_turns_toward_the_point_then_walks_to_it():
    assert walk_to(EMPTY, Pose(1.0, 1.0, 0.0), (2.0, 1.0)) == [FORWARD] * 4  # 1 m ahead: 4 x 0.25 m
    # 90 degrees to the left, 1 m away: six 15-degree turns, then four steps
    assert walk_to(EMPTY, Pose(1.0, 1.0, 0.0), (1.0, 2.0)) == [LEFT] * 6 + [FORWARD] * 4
    assert walk_to(EMPTY, Pose(1.0, 1.0, 0.0), (1.5, 0.5))[:3] == [RIGHT] * 3  # 45 degrees right
    assert walk_to(EMPTY, Pose(1.0, 1.0, 0.0), (1.05, 1.0)) == []  # already within half a step
    assert len(walk_to(EMPTY, Pose(1.0, 1.0, 0.0), (5.5, 1.0))) == 12  # capped (MAX_GOAL_ACTIONS)
    # a wall stops the walk: heading into x = 6 from 5.5, the clearance refuses the third step
    assert walk_to(EMPTY, Pose(5.5, 1.0, 0.0), (7.0, 1.0)) == [FORWARD]


def test_system_1_reaches_the_goal_from_the_datasets_own_pixel_goals():
    """The evaluator's execution path with a perfect System 2: at each decision the pixel goal is
    chosen by the dataset's rule on the noise-free expert's path from the current pose (rounded to
    an integer pixel, as a model writes it), STOP when the expert stops, its turn otherwise. Pixel
    to floor to walk must then reach the goal on held-out layouts: SR 0.95 or more over 40."""
    import dataclasses

    from vlmtrain.envs.gridnav import simulate
    from vlmtrain.envs.gridnav.camera import pixel_goal
    from vlmtrain.envs.gridnav.expert import expert_action, make_episode, reference_path
    from vlmtrain.envs.gridnav.metrics import summarize

    queues: dict[int, list[int]] = {}
    used = {"pixel": 0, "turn": 0}

    def oracle(states):
        out = []
        for st in states:
            if not queues.get(st.spec.index):
                expert = expert_action(st.spec, st.pose)
                path = reference_path(dataclasses.replace(st.spec, start=st.pose))
                gid, (u, v) = pixel_goal(st.spec.layout, path, 0, 64, 30.0)
                walk = walk_to_pixel(st.spec.layout, st.pose, (int(u), int(v)), 64, 30.0, 1.25) if gid >= 3 else []
                if walk:
                    used["pixel"] += len(walk)  # actions walked toward pixel goals
                else:
                    used["turn"] += expert != STOP
                queues[st.spec.index] = walk or [expert]
            out.append(queues[st.spec.index].pop(0))
        return out

    report = summarize(simulate.rollout([make_episode(1000, "test", i) for i in range(40)], oracle))
    assert report["sr"] >= 0.95, report
    assert used["pixel"] > used["turn"] > 0, used  # the pixel goals did most of the moving


def test_first_answers_are_what_the_reference_rules_answer():
    assert first_answers(2) == ["↓", "STOP", "←", "←←", "→", "→→"]
    assert len(first_answers(4)) == 10


def test_waypoint_prefixes():
    for ok in ("1", "12", "12 ", "12 3", "12 34"):
        assert _is_waypoint_prefix(ok)
    for bad in ("", " ", " 1", "1  ", "1 2 ", "a", "1,2"):
        assert not _is_waypoint_prefix(bad)


@pytest.mark.parametrize("family,end", [("qwen2_5_vl", "<|im_end|>"), ("qwen3_vl", "<|im_end|>"),
                                        ("idefics3", "<end_of_utterance>")])
def test_end_of_answer_token_and_digit_tokens_per_family(family, end, tmp_path, tiny_model_of, chat_tokenizer):
    model = tiny_model_of(family, tmp_path, chat_tokenizer)
    assert model.tokenizer.decode([end_of_answer_token(model)]) == end
    digits = waypoint_tokens(model)
    assert {"0", "5", " "} <= set(digits.values())
    assert all(set(text) <= set("0123456789 ") for text in digits.values())


@pytest.fixture(scope="module")
def n1_run(tmp_path_factory):
    """A tiny Qwen2.5-VL trained 3 steps by configs/internvla_n1_s2_gridnav.yaml on 12 GridNav
    episodes written with look-down frames and pixel goals, with a closed-loop validation at its end."""
    tmp = tmp_path_factory.mktemp("n1_eval")
    data = write_dataset(tmp / "data", episodes=12, seed=0, detour_p=0.5, lookdown_pitch=30, workers=1)
    cfg = load_config(RunConfig(), ROOT / "configs" / "internvla_n1_s2_gridnav.yaml", [
        f"model.path={save_tiny_qwen_vl(tmp / 'hf', family='qwen2_5_vl', seed=0)}", f"output_dir={tmp / 'run'}", f"data.index_dir={tmp / 'index'}",
        f"data.sources=[{{name: gridnav_125cm_0_30, format: internvla_n1, path: {data}}}]",
        "train.steps=3", "train.batch_size=8", "train.progress=false", "train.ckpt_every=0",
        "eval.every=3", "eval.rollout_episodes=2"])
    train(cfg)
    return tmp / "run", cfg


def test_an_n1_run_is_evaluated_with_pixel_goals(n1_run):
    run, cfg = n1_run
    assert is_n1_run(cfg)
    validation = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/sr" in m]
    assert [m["eval/episodes"] for m in validation] == [2]  # the validation rollouts ran the same policy
    report = evaluate_run(run, episodes=4)
    assert report["episodes"] == 4 and 0.0 <= report["sr"] <= 1.0
    decisions = report["decisions"]
    assert set(decisions) <= {"pixel_goal", "turn", "stop", "waypoint_off_floor"}
    # every episode asks the model at least once; an episode ends at STOP or the action cap
    assert sum(decisions.values()) >= 4
    assert decisions.get("stop", 0) <= 4
    assert json.loads((run / "eval.json").read_text())["decisions"] == decisions
    assert "decisions: " in format_report(report)
    assert math.isfinite(report["ne"])
