"""Episode-grouped sample orders: decisions that share frames land in the same step.

A VLN episode of T frames gives T decision samples whose history frames overlap (frame 0 is in every
one of them), but a shuffled batch rarely holds two samples of one episode: a step of 4 tiny-Qwen
samples encodes 7.6 frames per sample. Putting ``group_size`` decisions of one episode next to each
other in the epoch order makes the step's frame de-duplication (``loader.StepBuilder``) encode each
shared frame once: 4.2 frames per sample for groups of 4 from 26-frame episodes, 2.7 for groups of 8,
whether or not the encoder trains.

Episodes are not read from any format: they are the connected components of the sample - frame
graph (two samples are in one group when they share a frame, directly or through others), so
every data format groups the same way and text-only samples stay alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def frame_groups(frames_per_sample: Sequence[Sequence[int]]) -> np.ndarray:
    """Group id of each sample: the connected component of the samples that share frames (union-find
    over frame ids, near-linear in the number of frame references). Samples without frames get a
    group of their own."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for frames in frames_per_sample:
        if not frames:
            continue
        first = find(parent.setdefault(frames[0], frames[0]))
        for f in frames[1:]:
            other = find(parent.setdefault(f, f))
            if other != first:
                parent[other] = first
    offset = max(parent, default=-1) + 1  # ids for frame-less samples, past every frame id
    roots = [find(frames[0]) if frames else offset + i for i, frames in enumerate(frames_per_sample)]
    _, groups = np.unique(np.asarray(roots, dtype=np.int64), return_inverse=True)
    return groups.astype(np.int64)


def grouped_permutation(groups: np.ndarray, group_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random order of all samples in which samples of one group come in chunks of ``group_size``
    consecutive positions (:func:`grouped_chunks`). ``group_size`` <= 1: a plain permutation."""
    return grouped_chunks(groups, group_size, rng)[0]


def grouped_chunks(groups: np.ndarray, group_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(order, chunk bounds): each group is shuffled and cut into chunks of ``group_size``; the
    groups' shorter remainders are shuffled together and cut into chunks of ``group_size`` too (those
    mix groups), then all chunks are shuffled, so every chunk but the last has exactly ``group_size``
    samples and a step of a multiple of ``group_size`` samples starts on a chunk boundary. ``bounds``
    holds each chunk's start position in ``order`` and, last, its length."""
    n = len(groups)
    order = rng.permutation(n)
    if group_size <= 1 or n == 0:
        return order, np.arange(0, n + 1, dtype=np.int64) if n else np.zeros(1, dtype=np.int64)
    by_group = order[np.argsort(groups[order], kind="stable")]  # groups together, shuffled inside
    g = groups[by_group]
    new_group = np.r_[True, g[1:] != g[:-1]]
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.r_[starts, n])
    pos_in_group = np.arange(n) - np.repeat(starts, sizes)
    full = pos_in_group < np.repeat(sizes - sizes % group_size, sizes)  # inside a whole chunk of its group
    chunks = [c for c in np.split(by_group[full], np.arange(group_size, int(full.sum()), group_size)) if len(c)]
    rest = by_group[~full]
    if len(rest):
        remainders = np.split(rest, np.flatnonzero(np.r_[False, g[~full][1:] != g[~full][:-1]]))
        mixed = np.concatenate([remainders[i] for i in rng.permutation(len(remainders))])
        chunks += np.split(mixed, np.arange(group_size, len(mixed), group_size))
    short = [c for c in chunks if len(c) < group_size]  # at most one: the last piece of the mixed remainders
    whole = [c for c in chunks if len(c) == group_size]
    placed = [whole[i] for i in rng.permutation(len(whole))] + short
    lengths = np.array([len(c) for c in placed], dtype=np.int64)
    return np.concatenate(placed), np.r_[0, np.cumsum(lengths)].astype(np.int64)
