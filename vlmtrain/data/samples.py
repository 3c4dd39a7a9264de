"""Decision samples the InternVLA-N1 way, and their tokenisation.

A VLN episode of T frames gives T decision samples. Sample t shows the history frames
``unique(linspace(0, t-1, num_history))`` plus the current frame t, one image slot per frame, and
asks for the next action; the target is the action text (``↑``, ``←``, ``→`` or ``STOP``) and only
the assistant answer carries labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from transformers import PreTrainedTokenizerFast

from vlmtrain.data.tokenizer import ACTION_TOKENS, ASSISTANT, EOS, IMAGE, USER

IGNORE_INDEX = -100


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
    return template.format(history=IMAGE * num_history_frames, current=IMAGE, instruction=instruction.strip())


def action_text(action: int) -> str:
    """The assistant answer for an action id (0 STOP, 1 forward, 2 left, 3 right)."""
    return ACTION_TOKENS[int(action)]


def template_texts(instructions: Sequence[str], template: str = DEFAULT_PROMPT) -> list[str]:
    """Texts a tokenizer is trained on: every prompt shape the data produces."""
    texts = [user_prompt(i, 0, template) for i in instructions] + [user_prompt(i, 2, template) for i in instructions[:1]]
    return texts + list(ACTION_TOKENS)


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


class SampleTokenizer:
    """Tokenises decision samples; each ``<image>`` expands to ``tokens_per_image`` image-token ids.

    History frames may take fewer tokens (``tokens_per_history_image``; the model pools them) than the
    current frame. The prompt is tokenised once per (instruction, history length).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, tokens_per_image: int, max_length: int,
                 tokens_per_history_image: int | None = None, template: str = DEFAULT_PROMPT):
        self.tok = tokenizer
        self.template = template
        self.tokens_per_image = tokens_per_image
        self.tokens_per_history_image = tokens_per_history_image or tokens_per_image
        self.max_length = max_length
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self.user_id = tokenizer.convert_tokens_to_ids(USER)
        self.assistant_id = tokenizer.convert_tokens_to_ids(ASSISTANT)
        self.eos_id = tokenizer.convert_tokens_to_ids(EOS)
        self.action_ids = [tokenizer.convert_tokens_to_ids(a) for a in ACTION_TOKENS]
        self._cache: dict[tuple[str, int], list[int]] = {}

    def prompt_ids(self, instruction: str, num_history_frames: int) -> list[int]:
        """Ids of ``<|user|> prompt <|assistant|>`` with image slots expanded."""
        key = (instruction, num_history_frames)
        ids = self._cache.get(key)
        if ids is None:
            text = user_prompt(instruction, num_history_frames, self.template)
            raw = self.tok(text, add_special_tokens=False)["input_ids"]
            ids = [self.user_id]
            seen = 0
            for i in raw:
                if i == self.image_id:
                    seen += 1
                    current = seen == num_history_frames + 1
                    ids.extend([i] * (self.tokens_per_image if current else self.tokens_per_history_image))
                else:
                    ids.append(i)
            ids.append(self.assistant_id)
            self._cache[key] = ids
        return ids

    def __call__(self, sample: VLNSample) -> TokenizedSample:
        """Tokenise one sample; a sample longer than ``max_length`` is an error (never cut silently)."""
        prompt = self.prompt_ids(sample.instruction, len(sample.frames) - 1)
        answer = [self.action_ids[sample.target], self.eos_id]
        ids = prompt + answer
        if len(ids) > self.max_length:
            raise ValueError(
                f"sample episode={sample.episode} t={sample.t}: {len(ids)} tokens > data.max_length={self.max_length}"
            )
        labels = [IGNORE_INDEX] * len(prompt) + answer
        return TokenizedSample(ids, labels, sample.frames)
