"""Closed-loop GridNav evaluation of an InternVLA-N1 System-2 run: pixel goals, turns and STOP.

A run trained on ``internvla_n1`` sources under the reference rules answers the way InternNav's
System 2 does: ``↓`` (then, shown the look-down frame, a waypoint ``u v`` in it), a run of turns
(``←←``), or ``STOP``. :class:`PixelGoalPolicy` drives such a model through GridNav:

1. **First answer, by candidate scoring** (as ``evaluate.VLMPolicy`` scores actions): every live
   state's prompt (``reference_turns``: the training prompt, history frames, current frame) is scored
   against :data:`FIRST_ANSWERS`, the answers the reference rules produce (``↓``, ``STOP``, 1 to
   ``n1_future_steps`` turns either way); the most likely one wins.
2. **Waypoint, by constrained greedy decoding**: for ``↓`` the look-down frame of the current pose is
   rendered (``camera.render_pitched``, JPEG round trip as the dataset's frames), the second user turn
   appended, and ``u v`` decoded token by token, only tokens that keep the text a prefix of
   ``<digits> <digits>`` allowed, then the end-of-answer token.
3. **System 1, geometric**: InternVLA-N1's System 1 is a learned local policy; GridNav stands in with
   an exact one: the pixel is cast onto the floor (``camera.pixel_floor_point``) and the agent turns
   toward that point and walks to it (at most :data:`MAX_GOAL_ACTIONS` actions), simulated with the
   world's own motion model. Turn answers are executed as given; ``STOP`` stops.

The policy asks the model again when its queue of actions is empty. The report counts the decisions
of each kind and the waypoints that did not lie on the floor (``waypoint_off_floor``: one forward
step is taken instead).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import torch

from vlmtrain.config import RunConfig
from vlmtrain.config_sources import parse_dataset_name
from vlmtrain.data.formats.internvla_n1 import PROMPT as VLMTRAIN_N1_PROMPT
from vlmtrain.data.formats.internvla_n1_reference import LOOKDOWN, reference_turns
from vlmtrain.data.frames import resize_array
from vlmtrain.data.samples import history_indices
from vlmtrain.envs.gridnav.camera import pixel_floor_point, render_pitched
from vlmtrain.envs.gridnav.generate import parse_setting
from vlmtrain.envs.gridnav.render import decode_jpeg, encode_jpeg
from vlmtrain.envs.gridnav.simulate import EpisodeState
from vlmtrain.envs.gridnav.world import FORWARD, FORWARD_M, LEFT, RIGHT, STOP, TURN_RAD, Pose, step, wrap_angle
from vlmtrain.models.protocol import IGNORE_INDEX, VLM, Encoded, Turn
from vlmtrain.train.scoring import answer_log_likelihood, captured_logits, pad_encoded

log = logging.getLogger("vlmtrain")
MAX_GOAL_ACTIONS = 12  # System 1 walks at most this many actions toward one waypoint
MAX_WAYPOINT_TOKENS = 10
_WAYPOINT = re.compile(r"(\d+) (\d+)")
_SYMBOL_ACTION = {"←": LEFT, "→": RIGHT}


def first_answers(future_steps: int) -> list[str]:
    """The first answers the reference rules give: ``↓``, ``STOP`` and 1..``future_steps`` turns each way."""
    return [LOOKDOWN, "STOP"] + [sym * k for sym in ("←", "→") for k in range(1, future_steps + 1)]


def is_n1_run(cfg: RunConfig) -> bool:
    """Whether a run trained on InternVLA-N1 reference samples only (its policy is :class:`PixelGoalPolicy`)."""
    sources = cfg.data.sources
    return bool(sources) and all(s.format == "internvla_n1" for s in sources) and cfg.data.n1_samples == "reference"


def walk_to(layout, pose: Pose, goal: tuple[float, float], max_actions: int = MAX_GOAL_ACTIONS) -> list[int]:
    """GridNav's System 1: the actions that turn toward ``goal`` and walk to it (within half a forward
    step), simulated with the motion model; stops early at a wall or box (a forward that does not move)."""
    actions: list[int] = []
    while len(actions) < max_actions:
        dx, dy = goal[0] - pose.x, goal[1] - pose.y
        if math.hypot(dx, dy) < FORWARD_M / 2:
            break
        bearing = wrap_angle(math.atan2(dy, dx) - pose.heading)
        action = FORWARD if abs(bearing) <= TURN_RAD / 2 else (LEFT if bearing > 0 else RIGHT)
        nxt = step(layout, pose, action)
        if action == FORWARD and (nxt.x, nxt.y) == (pose.x, pose.y):
            break
        actions.append(action)
        pose = nxt
    return actions


def walk_to_pixel(layout, pose: Pose, pixel: Optional[tuple[int, int]], image_size: int, pitch_deg: float,
                  camera_height: float) -> list[int]:
    """System 1 for an integer waypoint ``pixel`` of the look-down image at ``pose``: cast its centre
    onto the floor and :func:`walk_to` it; [] when there is no pixel or its ray misses the floor."""
    if pixel is None:
        return []
    point = pixel_floor_point(pose, pixel[0] + 0.5, pixel[1] + 0.5, image_size, pitch_deg, camera_height=camera_height)
    return walk_to(layout, pose, point) if point is not None else []


class PixelGoalPolicy:
    """An InternVLA-N1 System-2 model of any family as a batched GridNav policy (module docstring)."""

    def __init__(self, model: VLM, cfg: RunConfig, device: torch.device, image_size: int = 64,
                 batch_size: int = 16):
        spec = parse_dataset_name(cfg.data.sources[0].name)
        self.camera_height, self.pitch = parse_setting(spec.lookdown_setting)
        self.model, self.device, self.batch_size, self.image_size = model, device, batch_size, image_size
        self.num_history, self.prompt = cfg.data.num_history, cfg.data.n1_prompt
        self.answers = first_answers(cfg.data.n1_future_steps)
        self.size = model.frame_size[0]
        self.pad_id = int(model.tokenizer.pad_token_id)
        self.queues: dict[int, list[int]] = {}
        self.decisions: Counter[str] = Counter()
        self._digit_tokens = waypoint_tokens(model)
        self._end_id = end_of_answer_token(model)

    # -- the policy ----------------------------------------------------------------------------------
    def __call__(self, states: list[EpisodeState]) -> list[int]:
        """One action per live state: the next of its queue, after asking the model where it is empty."""
        live = {s.spec.index for s in states}
        self.queues = {k: v for k, v in self.queues.items() if k in live}
        todo = [s for s in states if not self.queues.get(s.spec.index)]
        for i in range(0, len(todo), self.batch_size):
            self._decide(todo[i: i + self.batch_size])
        return [self.queues[s.spec.index].pop(0) for s in states]

    def report(self) -> dict:
        """Decisions taken per kind (``pixel_goal``, ``turn``, ``stop``, ``waypoint_off_floor``)."""
        return dict(sorted(self.decisions.items()))

    def _decide(self, states: Sequence[EpisodeState]) -> None:
        history = [history_indices(len(s.frames) - 1, self.num_history) for s in states]
        frames = [[s.frames[h] for h in hist] + [s.frames[-1]] for s, hist in zip(states, history)]
        turns = [self._turns(s, len(h), [a]) for s, h in zip(states, history) for a in self.answers]
        features: dict[int, torch.Tensor] = {}
        self._encode_frames(features, frames)
        scores = self._score([self.model.encode_conversation(t) for t in turns],
                             [f for f in frames for _ in self.answers], features).view(len(states), len(self.answers))
        best = [self.answers[i] for i in scores.argmax(-1).tolist()]
        goals = [i for i, a in enumerate(best) if a == LOOKDOWN]
        if goals:
            down = [self._lookdown(states[i].spec.layout, states[i].pose) for i in goals]
            with_down = [frames[i] + [d] for i, d in zip(goals, down)]
            self._encode_frames(features, with_down)  # only the look-down frames are new
            pixels = self._waypoints([states[i] for i in goals], [len(history[i]) for i in goals], with_down, features)
            for i, px in zip(goals, pixels):
                self.queues[states[i].spec.index] = self._walk(states[i], px)
        for i, answer in enumerate(best):
            if answer == "STOP":
                self.decisions["stop"] += 1
                self.queues[states[i].spec.index] = [STOP]
            elif answer != LOOKDOWN:
                self.decisions["turn"] += 1
                self.queues[states[i].spec.index] = [_SYMBOL_ACTION[c] for c in answer]

    def _walk(self, state: EpisodeState, pixel: Optional[tuple[int, int]]) -> list[int]:
        actions = walk_to_pixel(state.spec.layout, state.pose, pixel, self.image_size, self.pitch, self.camera_height)
        if not actions:
            self.decisions["waypoint_off_floor"] += 1
            return [FORWARD]
        self.decisions["pixel_goal"] += 1
        return actions

    # -- the model -----------------------------------------------------------------------------------
    def _turns(self, state: EpisodeState, history: int, answers: list[str]) -> list[Turn]:
        record = f"gridnav eval episode {state.spec.index} t={len(state.frames) - 1}"
        turns = reference_turns(state.spec.instruction, history, record, answers, self.prompt, VLMTRAIN_N1_PROMPT)
        return [Turn(role, text) for role, text in turns]

    def _lookdown(self, layout, pose: Pose) -> np.ndarray:
        """The look-down frame at ``pose`` exactly as a written dataset holds it (JPEG round trip)."""
        img = render_pitched(layout, pose, self.image_size, self.pitch, camera_height=self.camera_height)
        return decode_jpeg(encode_jpeg(img))

    def _encode_frames(self, features: dict[int, torch.Tensor], frames: Sequence[Sequence[np.ndarray]]) -> None:
        """Add to ``features`` (keyed by ``id`` of each frame array, alive for the decision) the visual
        tokens of every frame in ``frames`` not in it yet, in one ``encode_images`` call: each frame of a
        decision is encoded once, for the scored answers and every waypoint token."""
        todo = {id(f): f for row in frames for f in row if id(f) not in features}
        if not todo:
            return
        batch = torch.from_numpy(np.stack([resize_array(f, self.size) for f in todo.values()]))
        fresh = self.model.encode_images(self.model.prepare_frames(batch.permute(0, 3, 1, 2).contiguous()).to(self.device))
        features.update(zip(todo, fresh))

    def _embed(self, encoded: Sequence[Encoded], frames: Sequence[Sequence[np.ndarray]],
               features: dict[int, torch.Tensor]):
        """Embeddings, labels, mask and positions of padded rows whose images are ``frames`` (their
        visual tokens in ``features``, :meth:`_encode_frames`)."""
        for e, f in zip(encoded, frames):
            if e.num_images != len(f):
                raise ValueError(f"prompt has {e.num_images} image slots for {len(f)} frames")
        keys = list(dict.fromkeys(id(f) for row in frames for f in row))
        row_of = {k: r for r, k in enumerate(keys)}
        slots = [row_of[id(f)] for row in frames for f in row]
        ages = [age for row in frames for age in range(len(row) - 1, -1, -1)]
        ids, labels, mask = pad_encoded(encoded, self.pad_id, self.device)
        embeds = self.model.embed(ids, torch.stack([features[k] for k in keys]),
                                  torch.tensor(slots, dtype=torch.long, device=self.device),
                                  torch.tensor(ages, dtype=torch.long, device=self.device))
        return embeds, labels, mask, self.model.position_ids(ids, mask)

    @torch.no_grad()
    def _score(self, encoded: list[Encoded], frames: list[list[np.ndarray]],
               features: dict[int, torch.Tensor]) -> torch.Tensor:
        embeds, labels, mask, positions = self._embed(encoded, frames, features)
        return answer_log_likelihood(self.model, embeds, labels, mask, positions).cpu()

    @torch.no_grad()
    def _waypoints(self, states: Sequence[EpisodeState], history: Sequence[int],
                   frames: Sequence[list[np.ndarray]], features: dict[int, torch.Tensor]
                   ) -> list[Optional[tuple[int, int]]]:
        """``u v`` of each state by constrained greedy decoding after the look-down turn (None: no
        well-formed waypoint within :data:`MAX_WAYPOINT_TOKENS` tokens)."""
        prefixes = [self._prefix(self.model.encode_conversation(self._turns(s, h, [LOOKDOWN, "0 0"])))
                    for s, h in zip(states, history)]
        texts = [""] * len(states)
        done = [False] * len(states)
        for _ in range(MAX_WAYPOINT_TOKENS):
            rows = [i for i in range(len(states)) if not done[i]]
            if not rows:
                break
            # each row: its prefix + the tokens so far + one placeholder whose label asks for the next token
            encoded = [self._probe(prefixes[i]) for i in rows]
            embeds, labels, mask, positions = self._embed(encoded, [frames[i] for i in rows], features)
            with captured_logits(self.model) as captured:
                self.model.forward_lm(embeds, labels, attention_mask=mask, position_ids=positions)
            logits = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).float().cpu()
            for r, i in enumerate(rows):
                token = self._constrained_argmax(logits[r], texts[i])
                if token is None or token == self._end_id:
                    done[i] = True
                    continue
                prefixes[i] = Encoded(prefixes[i].input_ids + [token], prefixes[i].labels + [IGNORE_INDEX],
                                      prefixes[i].num_images)
                texts[i] += self._digit_tokens[token]
        out = []
        for text in texts:
            m = _WAYPOINT.fullmatch(text)
            out.append((int(m.group(1)), int(m.group(2))) if m else None)
        return out

    def _prefix(self, encoded: Encoded) -> Encoded:
        """``encoded`` cut before its last answer (the start of its last run of labelled tokens)."""
        labels = encoded.labels
        end = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        return Encoded(list(encoded.input_ids[:start]), [IGNORE_INDEX] * start, encoded.num_images)

    def _probe(self, prefix: Encoded) -> Encoded:
        return Encoded(prefix.input_ids + [self.pad_id], prefix.labels + [self.pad_id], prefix.num_images)

    def _constrained_argmax(self, logits: torch.Tensor, text: str) -> Optional[int]:
        allowed = [t for t, s in self._digit_tokens.items() if _is_waypoint_prefix(text + s)]
        if _WAYPOINT.fullmatch(text):
            allowed.append(self._end_id)
        if not allowed:
            return None
        ids = torch.tensor(allowed)
        return int(ids[logits[ids].argmax()])


def waypoint_tokens(model: VLM) -> dict[int, str]:
    """The model's vocabulary entries made of digits and at most one space (what ``u v`` is written
    with), by id."""
    tok = model.tokenizer
    out = {}
    for i in range(len(tok)):
        s = tok.decode([i])
        if s and re.fullmatch(r"\d* ?\d*", s):
            out[i] = s
    return out


def end_of_answer_token(model: VLM) -> int:
    """The family's end-of-answer token: the labelled token right after an answer ``0 0``."""
    encoded = model.encode_conversation([Turn("user", "x"), Turn("assistant", "0 0")])
    labelled = [t for t in encoded.labels if t != IGNORE_INDEX]
    for k in range(1, len(labelled)):
        if model.tokenizer.decode(labelled[:k]).strip() == "0 0":
            return int(labelled[k])
    raise ValueError(f"{model.family}: cannot find the end-of-answer token after an answer")


def _is_waypoint_prefix(text: str) -> bool:
    """Whether ``text`` can still grow into ``<digits> <digits>``."""
    return bool(re.fullmatch(r"\d+( \d*)?", text))
