"""InternVLA-N1 System-2 samples built the way InternNav's own dataset builds them (the default).

The rules (public facts of the reference recipe; ``docs/data_formats.md`` lists them with the knobs):

- per episode and per instruction, ``actions = action[1:] + [0]`` (the episode's decision targets);
  an episode shorter than 4 frames gives nothing;
- starts ``s = 0, k, 2k, ...`` (``sample_step`` k) up to ``n``, without ``s = n`` and ``s = n - 1``;
- the look-down setting's ``relative_goal_frame_id`` at ``s`` decides the kind: ``-1`` and a forward
  action at ``s``: no sample; ``-1`` otherwise: a **turn** sample, answer the actions from ``s`` up to
  (not including) the first forward, at most ``num_future_steps``, as ``← → STOP`` symbols; below 3: no
  sample; else a **pixel-goal** sample: answer ``↓``, a user turn ``{conjunction}<image>.`` with the
  look-down frame ``s``, answer ``"u v"`` from ``goal.<look-down setting>[s]``;
- one **STOP** sample per instruction at frame ``n - 1`` (answer ``STOP``), listed ``stop_repeat``
  times; ``pixel_goal_only`` keeps the pixel-goal samples alone;
- images: history frames ``unique(linspace(0, s - 1, num_history))`` (none at ``s = 0``) and frame
  ``s`` of the history setting, then the look-down frame of a pixel-goal sample;
- the prompt (``prompt="reference"``): :data:`REFERENCE_PROMPT` with the instruction, the history
  sentence when there is history, then ``" {conjunction}<image>."``; the system turn
  :data:`SYSTEM_PROMPT`. The conjunction is drawn per sample from :data:`CONJUNCTIONS`, seeded by the
  sample's own record (source, episode, instruction, start), so it is the same on every rank, every
  resume and every rebuild of the index. The reference draws it unseeded.

``prompt="vlmtrain"`` keeps these samples with vlmtrain's own wording (``internvla_n1.PROMPT``);
``samples="every_frame"`` is vlmtrain's earlier rule (one sample per frame, ``internvla_n1``'s module
docstring).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from os import PathLike
from typing import Optional, Sequence

import numpy as np

from vlmtrain.data.conversation import ConvSample, ImageRef
from vlmtrain.data.samples import history_indices

SAMPLE_RULES = ("reference", "every_frame")
PROMPTS = ("reference", "vlmtrain")
SYSTEM_PROMPT = "You are a helpful assistant."
REFERENCE_PROMPT = (
    "You are an autonomous navigation assistant. Your task is to <instruction>. Where should you go next to stay "
    "on track? Please output the next waypoint's coordinates in the image. Please output STOP when you have "
    "successfully completed the task."
)
HISTORY_SENTENCE = " These are your historical observations: {images}."
CONJUNCTIONS = ("you can see ", "in front of you is ", "there is ", "you can spot ", "you are toward the ",
                "ahead of you is ", "in your sight is ")
FORWARD = 1
SYMBOLS = {0: "STOP", 1: "↑", 2: "←", 3: "→"}
LOOKDOWN = "↓"
MIN_EPISODE = 4  # frames: shorter episodes give no sample
MIN_GOAL_FRAME = 3  # a relative goal frame id below this (other than -1) gives no sample
KINDS = ("pixel_goal", "turn", "stop")


@dataclass(frozen=True)
class N1Rules:
    """How an ``internvla_n1`` source becomes samples (``data.n1_*``)."""

    samples: str = "reference"  # reference | every_frame
    prompt: str = "reference"  # reference | vlmtrain
    sample_step: int = 4
    num_future_steps: int = 4
    stop_repeat: int = 5
    pixel_goal_only: bool = False

    def __post_init__(self) -> None:
        if self.samples not in SAMPLE_RULES:
            raise ValueError(f"data.n1_samples={self.samples!r}: expected one of {list(SAMPLE_RULES)}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"data.n1_prompt={self.prompt!r}: expected one of {list(PROMPTS)}")
        for name in ("sample_step", "num_future_steps", "stop_repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.n1_{name}={getattr(self, name)}: must be >= 1")

    def to_json(self) -> str:
        """The rules as one JSON string (part of a sample index's key)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "N1Rules":
        """The rules :meth:`to_json` wrote ("" gives the defaults)."""
        return cls(**json.loads(text)) if text else cls()


def rules_from_config(dcfg) -> N1Rules:
    """The ``data.n1_*`` keys as :class:`N1Rules`."""
    return N1Rules(dcfg.n1_samples, dcfg.n1_prompt, dcfg.n1_sample_step, dcfg.n1_future_steps, dcfg.n1_stop_repeat,
                   dcfg.n1_pixel_goal_only)


def conjunction(record: str, draw: int = 0) -> str:
    """The ``draw``-th conjunction of the sample ``record`` (seeded by the record: the same everywhere)."""
    digest = hashlib.blake2b(f"{record}\x00{draw}".encode(), digest_size=8).digest()
    return CONJUNCTIONS[int.from_bytes(digest, "little") % len(CONJUNCTIONS)]


def reference_user_text(instruction: str, history: int, conj: str) -> str:
    """The reference's first user turn for ``history`` history frames and conjunction ``conj``: the
    template with ``<instruction>.`` replaced by the instruction as stored (InternData-N1 instructions
    end with their own period; one without a final ``.``, ``!`` or ``?`` gets a period)."""
    if not instruction.rstrip().endswith((".", "!", "?")):
        instruction = instruction.rstrip() + "."  # GridNav's instructions end without one
    text = REFERENCE_PROMPT.replace("<instruction>.", instruction)
    if history:
        text += HISTORY_SENTENCE.format(images="<image>\n" * history)
    return text + f" {conj}<image>."


def reference_turns(instruction: str, history: int, record: str, answers: Sequence[str], prompt: str = "reference",
                    vlmtrain_prompt: Optional[str] = None) -> list[tuple[str, str]]:
    """The conversation of one sample (system, user, answer; a pixel-goal sample, whose ``answers`` are
    ``["↓", "u v"]``, adds the look-down user turn and its answer): images are ``history`` history
    frames, the current one, then the look-down frame. ``prompt``: ``reference`` or ``vlmtrain``
    (``vlmtrain_prompt``, the user-turn template with ``{instruction}`` and ``{history}``). The
    conjunctions are drawn from ``record``. Training samples and the closed-loop evaluator
    (``train/evaluate_n1.py``) both build their turns here."""
    if prompt == "reference":
        user = reference_user_text(instruction, history, conjunction(record, 0))
        follow = f"{conjunction(record, 1)}<image>."
    else:
        hist = "Earlier views: " + "<image>" * history + ". " if history else ""
        user = vlmtrain_prompt.format(instruction=instruction, history=hist)
        follow = "Looking down: <image>. Give the waypoint in this image."
    turns = [("system", SYSTEM_PROMPT), ("user", user), ("assistant", answers[0])]
    if len(answers) > 1:
        turns += [("user", follow), ("assistant", answers[1])]
    return turns


def turn_answer(actions: np.ndarray, s: int, horizon: int) -> str:
    """The actions from ``s`` up to (not including) the first forward, at most ``horizon``, as symbols."""
    out = []
    for a in actions[s:]:
        if int(a) == FORWARD or len(out) == horizon:
            break
        out.append(SYMBOLS[int(a)])
    return "".join(out)


def record_kind(record: str) -> Optional[str]:
    """The kind a reference sample's record ends with (None for other records)."""
    words = record.rsplit(" ", 2)
    if words[-1] in ("pixel_goal", "turn"):
        return words[-1]
    return "stop" if len(words) == 3 and words[-2] == "stop" and words[-1].isdigit() else None


def record_end_kinds(last_bytes: np.ndarray) -> dict[str, int]:
    """Samples per kind from the last byte of each reference record (uint8 array): the kinds
    :func:`record_kind` reads end in ``l`` (``pixel_goal``), ``n`` (``turn``) and a digit (``stop {copy}``);
    anything else counts as ``other``. Lets a sample index count kinds without decoding records."""
    hits = {"pixel_goal": last_bytes == ord("l"), "turn": last_bytes == ord("n"),
            "stop": (last_bytes >= ord("0")) & (last_bytes <= ord("9"))}
    counts = {kind: int(hit.sum()) for kind, hit in hits.items()}
    counts["other"] = len(last_bytes) - sum(counts.values())
    return {kind: n for kind, n in counts.items() if n}


def sample_kind(sample: ConvSample) -> str:
    """``pixel_goal`` | ``turn`` | ``stop`` of a reference sample (from its first answer)."""
    first = next(text for role, text in sample.turns if role == "assistant")
    return "pixel_goal" if first == LOOKDOWN else ("stop" if first == "STOP" else "turn")


def build_reference_samples(
    targets: np.ndarray,
    instructions: Sequence[str],
    frames: Sequence[str | PathLike[str]],
    source: str,
    record_prefix: str,
    rules: N1Rules,
    num_history: int = 8,
    lookdown_frames: Optional[Sequence[str | PathLike[str]]] = None,
    goals: Optional[np.ndarray] = None,
    goal_ids: Optional[np.ndarray] = None,
    vlmtrain_prompt: Optional[str] = None,
) -> list[ConvSample]:
    """One episode's samples under the reference rules (module docstring), in the reference's order:
    per instruction, the starts in order, then the STOP sample ``stop_repeat`` times.

    ``targets``: the decision targets (``action[1:] + [0]``); ``goal_ids`` / ``goals``: the look-down
    setting's ``relative_goal_frame_id`` and ``goal`` columns (None: no look-down data, every goal id
    counts as -1). ``vlmtrain_prompt``: the user-turn template of ``prompt="vlmtrain"`` (``{instruction}``,
    ``{history}``). Records are ``"{record_prefix} s={s}"`` (+ ``" instruction {k}"``), then the kind:
    ``" pixel_goal"``, ``" turn"`` or ``" stop {r}"`` (copy r): :func:`record_kind` reads it back.
    """
    n = len(targets)
    if n < MIN_EPISODE:
        return []
    frames = [os.path.abspath(p) for p in frames]
    down = [os.path.abspath(p) for p in lookdown_frames] if lookdown_frames is not None else None
    out: list[ConvSample] = []
    for k, instruction in enumerate(instructions):
        suffix = f" instruction {k}" if len(instructions) > 1 else ""

        def sample(s: int, record: str, answers: list[str], lookdown: bool) -> ConvSample:
            history = history_indices(s, num_history)
            images = [frames[h] for h in history] + [frames[s]] + ([down[s]] if lookdown else [])
            turns = reference_turns(instruction, len(history), record, answers, rules.prompt, vlmtrain_prompt)
            return ConvSample(source, record, tuple(turns), tuple(ImageRef(p) for p in images))

        for s in range(0, n + 1, rules.sample_step):
            if s >= n - 1:
                continue
            record = f"{record_prefix} s={s}{suffix}"
            gid = int(goal_ids[s]) if goal_ids is not None else -1
            if gid == -1:
                if int(targets[s]) == FORWARD or rules.pixel_goal_only:
                    continue
                out.append(sample(s, f"{record} turn", [turn_answer(targets, s, rules.num_future_steps)], False))
            elif gid >= MIN_GOAL_FRAME and down is not None and goals is not None:
                u, v = (int(round(float(x))) for x in goals[s])
                out.append(sample(s, f"{record} pixel_goal", [LOOKDOWN, f"{u} {v}"], True))
        if not rules.pixel_goal_only:  # each copy its own record: its own conjunction, as the reference draws
            out += [sample(n - 1, f"{record_prefix} s={n - 1}{suffix} stop {r}", ["STOP"], False)
                    for r in range(rules.stop_repeat)]
    return out
