"""Decision samples the InternVLA-N1 way, as conversations.

A VLN episode of T frames gives T decision samples. Sample t shows the history frames
``unique(linspace(0, t-1, num_history))`` plus the current frame t, one image slot per frame, and
asks for the next action; the answer is the action text (``↑``, ``←``, ``→`` or ``STOP``).
``decision_turns`` is the one place the conversation of a decision is written: the data path
(``data/sources.py``) and the closed-loop evaluator (``train/evaluate.py``) both call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vlmtrain.models.protocol import IMAGE_PLACEHOLDER, Turn

ACTION_TEXTS = ("STOP", "↑", "←", "→")  # index = action id (0 STOP, 1 forward 0.25 m, 2 left 15°, 3 right 15°)


def history_indices(t: int, num_history: int = 8) -> list[int]:
    """Frames shown as history at decision ``t``: ``unique(linspace(0, t-1, num_history))`` (none at t=0)."""
    if t <= 0:
        return []
    return np.unique(np.linspace(0, t - 1, num_history).astype(np.int64)).tolist()


DEFAULT_PROMPT = "{history} now: {current} {instruction}."


def user_prompt(instruction: str, num_history_frames: int, template: str = DEFAULT_PROMPT) -> str:
    """The user turn from ``template``: ``{history}`` becomes one ``<image>`` per history frame,
    ``{current}`` the current frame's ``<image>``, ``{instruction}`` the instruction.

    The default is short on purpose (every text token is paid for in every sample; the frame-age
    embedding already tells the model which slot is the current view) and puts the instruction last,
    next to the answer, where a small causal LM reads it after every frame.
    """
    return template.format(history=IMAGE_PLACEHOLDER * num_history_frames, current=IMAGE_PLACEHOLDER,
                           instruction=instruction.strip())


def action_text(action: int) -> str:
    """The assistant answer for an action id (0 STOP, 1 forward, 2 left, 3 right)."""
    return ACTION_TEXTS[int(action)]


def decision_turns(instruction: str, num_history_frames: int, action: int, template: str = DEFAULT_PROMPT
                   ) -> tuple[Turn, Turn]:
    """The two-turn conversation of one decision: the ``template`` user turn with one ``<image>`` per
    history frame and the current frame's, then the action text as the answer."""
    return (Turn("user", user_prompt(instruction, num_history_frames, template)), Turn("assistant", action_text(action)))


@dataclass(frozen=True)
class VLNSample:
    """One decision: ``frames`` are global frame ids (history oldest first, current last)."""

    episode: int  # position of the episode in the dataset list
    t: int  # decision frame within the episode
    instruction: str
    frames: tuple[int, ...]
    target: int  # action id


@dataclass
class TokenizedSample:
    """Token ids with labels on the answer only; ``frames`` fill the image slots in order."""

    input_ids: list[int]
    labels: list[int]
    frames: tuple[int, ...]


def build_vln_samples(
    episodes: Sequence, frame_offsets: Sequence[int], num_history: int = 8
) -> list[VLNSample]:
    """All decision samples of ``episodes`` (``VLNEpisode``s); frame ids are ``frame_offsets[e] + t``."""
    samples = []
    for e, (ep, offset) in enumerate(zip(episodes, frame_offsets)):
        instruction = ep.instructions[0]
        for t in range(ep.length):
            frames = tuple(offset + h for h in history_indices(t, num_history)) + (offset + t,)
            samples.append(VLNSample(e, t, instruction, frames, int(ep.targets[t])))
    return samples
