"""Every on-disk format read into conversation samples (`ConvSample`), one call per data source.

Conversation formats (LLaVA JSON, InternVL meta, InternVLA-N1 scenes) already yield `ConvSample`s.
Plain VLN episodes (LeRobot VLN such as GridNav, StreamVLN) become decision samples the InternVLA-N1
way (``build_vln_samples``: history frames + current frame, target = next action) and then a
two-turn conversation (``samples.decision_turns``): the user turn from the ``data.prompt`` template,
the action text as answer. Every model family reads its data through here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vlmtrain.data.conversation import ConvSample, ImageRef
from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.internvl_meta import read_internvl_meta
from vlmtrain.data.formats.internvla_n1 import read_internvla_n1
from vlmtrain.data.formats.internvla_n1_reference import N1Rules
from vlmtrain.data.formats.lerobot import VLNEpisode, iter_dataset_roots, read_lerobot_vln
from vlmtrain.data.formats.llava_json import read_llava_json
from vlmtrain.data.formats.streamvln import read_streamvln
from vlmtrain.data.samples import build_vln_samples, decision_turns

__all__ = ["SourceSamples", "read_source", "vln_conversations"]


@dataclass
class SourceSamples:
    """The samples of one mixture entry.

    Attributes:
        name: mixture key (unique in a run).
        path: what errors about its samples blame (the annotation file, the dataset root).
        percent: share of the samples a run keeps (``plan_mixture``).
        samples: the samples, in reader order.
    """

    name: str
    path: Path
    percent: float
    samples: list[ConvSample]


def vln_conversations(episodes: Sequence[VLNEpisode], source: str, num_history: int, prompt: str) -> list[ConvSample]:
    """Decision samples of ``episodes`` as conversations: ``prompt`` filled with one ``<image>`` per
    history frame, the current frame's ``<image>`` and the instruction; the answer is the action text."""
    offsets, paths = [], []
    for ep in episodes:
        offsets.append(len(paths))
        paths.extend(os.path.abspath(p) for p in ep.frame_paths)
    samples = []
    for s in build_vln_samples(episodes, offsets, num_history):
        ep = episodes[s.episode]
        turns = tuple((t.role, t.text) for t in decision_turns(s.instruction, len(s.frames) - 1, s.target, prompt))
        samples.append(ConvSample(source, f"{ep.root.name}/episode {ep.episode_index} t={s.t}", turns,
                                  tuple(ImageRef(paths[f]) for f in s.frames)))
    return samples


def _lerobot_episodes(path: Path, setting: str, policy: ErrorPolicy) -> list[VLNEpisode]:
    try:
        roots = iter_dataset_roots(path)
    except FileNotFoundError as e:
        policy.handle(DataError(path, "missing_file", detail=str(e)))
        return []
    return [ep for root in roots for ep in read_lerobot_vln(root, setting=setting, policy=policy)]


def read_source(
    fmt: str, name: str, path: str | Path, image_root: str, percent: float, policy: ErrorPolicy, *,
    seed: int, setting: str, num_history: int, prompt: str, n1: N1Rules = N1Rules(),
) -> list[SourceSamples]:
    """Read one configured source; returns one entry per mixture source it holds (an InternVL meta
    file holds several, each weighted by its ``repeat_time`` times ``percent``).

    ``setting`` (camera setting) applies to ``lerobot_vln``; ``num_history`` to every navigation
    format; ``prompt`` to ``lerobot_vln`` and ``streamvln`` (InternVLA-N1 samples carry their own
    prompt); ``n1`` (the InternVLA-N1 rules) to ``internvla_n1``. Bad records go to ``policy``.
    """
    path = Path(path)
    if fmt == "lerobot_vln":
        episodes = _lerobot_episodes(path, setting, policy)
        return [SourceSamples(name, path, percent, vln_conversations(episodes, name, num_history, prompt))]
    if fmt == "streamvln":
        episodes = read_streamvln(path, policy)
        return [SourceSamples(name, path, percent, vln_conversations(episodes, name, num_history, prompt))]
    if fmt == "internvla_n1":
        # Read at 100 %: the mixture plan applies the percent with the same seeded selection
        # (select_indices keyed by the dataset name) that read_internvla_n1's own "%N" would.
        samples = read_internvla_n1(path, name, policy, seed=seed, num_history=num_history, rules=n1)
        return [SourceSamples(name, path, percent, samples)]
    if fmt == "llava_json":
        root = Path(image_root) if image_root else path.parent
        return [SourceSamples(name, path, percent, read_llava_json(path, root, policy, source=name))]
    if fmt == "internvl_meta":
        return [SourceSamples(entry.name, entry.annotation, entry.percent * percent / 100.0, list(entry.samples))
                for entry in read_internvl_meta(path, policy)]
    raise ValueError(f"unknown data format {fmt!r}")
