"""GridNav: a small synthetic vision-language navigation world (numpy + PIL + pyarrow only).

Rooms with four coloured boxes, an egocentric renderer, a frame-inferable expert with noisy
(DAgger-like) demonstrations, a lockstep closed-loop evaluator, nDTW/SR/SPL metrics and a
LeRobot v2.1 writer. Splits draw layouts from disjoint seed streams (see ``world``).
"""

from .expert import (Demo, demonstrate, expert_action, make_episode, reference_length,
                     reference_path)
from .generate import camera_to_world, parse_setting, write_dataset
from .metrics import OUTCOMES, EpisodeResult, ndtw, summarize
from .render import decode_jpeg, encode_jpeg, observe, render
from .simulate import (EpisodeState, Policy, expert_policy, forward_policy, random_policy,
                       rollout)
from .world import (ACTION_NAMES, FORWARD, FORWARD_M, LEFT, MAX_STEPS, PALETTE, RIGHT, STOP,
                    STOP_RADIUS, SUCCESS_RADIUS, TURN_RAD, EpisodeSpec, GridObject, Layout, Pose,
                    episode_rng, goal_bearing, goal_distance, step)

__all__ = [
    "ACTION_NAMES", "FORWARD", "FORWARD_M", "LEFT", "MAX_STEPS", "OUTCOMES", "PALETTE", "RIGHT",
    "STOP", "STOP_RADIUS", "SUCCESS_RADIUS", "TURN_RAD",
    "Demo", "EpisodeResult", "EpisodeSpec", "EpisodeState", "GridObject", "Layout", "Policy",
    "Pose",
    "camera_to_world", "decode_jpeg", "demonstrate", "encode_jpeg", "episode_rng",
    "expert_action", "expert_policy", "forward_policy", "goal_bearing", "goal_distance",
    "make_episode", "ndtw", "observe", "parse_setting", "random_policy", "reference_length",
    "reference_path", "render", "rollout", "step", "summarize", "write_dataset",
]
