"""From a VLN dataset on disk to tokenised decision samples and decoded frames (one call at start-up)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import PreTrainedTokenizerFast

from vlmtrain.data.errors import ErrorPolicy
from vlmtrain.data.formats.lerobot import iter_dataset_roots, read_lerobot_vln
from vlmtrain.data.frames import LazyFrames, decode_frames
from vlmtrain.data.samples import SampleTokenizer, TokenizedSample, build_vln_samples, template_texts
from vlmtrain.data.tokenizer import train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class VLNData:
    """Everything the loop needs from the data."""

    samples: list[TokenizedSample]
    frames: torch.Tensor  # (N, 3, S, S) uint8, every frame of every episode once (LazyFrames with data.workers > 0)
    tokenizer: PreTrainedTokenizerFast
    sample_tokenizer: SampleTokenizer
    num_episodes: int
    skipped: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict:
        """Counts reported at start and in ``summary.json``."""
        n = len(self.samples)
        return {
            "episodes": self.num_episodes, "samples": n, "frames": int(self.frames.shape[0]),
            "mean_tokens_per_sample": round(sum(len(s.input_ids) for s in self.samples) / max(n, 1), 2),
            "mean_images_per_sample": round(sum(len(s.frames) for s in self.samples) / max(n, 1), 3),
            "skipped": dict(self.skipped),
        }


def ensure_gridnav(dcfg) -> None:
    """Generate the GridNav training set into ``data.root`` when asked (``gridnav_episodes > 0``) and absent."""
    root = Path(dcfg.root)
    if dcfg.gridnav_episodes <= 0 or (root / "meta" / "info.json").exists():
        return
    from vlmtrain.data.gridnav.generate import write_dataset

    log.info("generating %d GridNav episodes into %s", dcfg.gridnav_episodes, root)
    write_dataset(root, episodes=dcfg.gridnav_episodes, seed=dcfg.gridnav_seed, split="train",
                  noise_p=dcfg.gridnav_noise, detour_p=dcfg.gridnav_detour, setting=dcfg.setting)


def load_vln_data(
    dcfg, image_tokens: tuple[int, int], vocab_size: int, tokenizer: Optional[PreTrainedTokenizerFast] = None
) -> VLNData:
    """Read every episode under ``data.root``, build and tokenise decision samples, decode frames once.

    ``image_tokens`` = (tokens of the current frame, tokens of a history frame). A tokenizer is trained
    on the data's text when none is given (a resumed run passes its saved one).
    """
    ensure_gridnav(dcfg)
    roots = iter_dataset_roots(Path(dcfg.root))
    if not roots:
        raise FileNotFoundError(f"{dcfg.root}: no LeRobot dataset (meta/info.json) found")
    policy = ErrorPolicy(dcfg.on_error)
    episodes = []
    for root in roots:
        episodes.extend(read_lerobot_vln(root, setting=dcfg.setting, policy=policy))
    if not episodes:
        raise ValueError(f"{dcfg.root}: no usable episode (skipped: {policy.summary()})")
    offsets, paths = [], []
    for ep in episodes:
        offsets.append(len(paths))
        paths.extend(ep.frame_paths)
    samples = build_vln_samples(episodes, offsets, dcfg.num_history)
    if tokenizer is None:
        instructions = sorted({i for ep in episodes for i in ep.instructions})
        tokenizer = train_tokenizer(template_texts(instructions, dcfg.prompt), vocab_size)
    stok = SampleTokenizer(tokenizer, image_tokens[0], dcfg.max_length, image_tokens[1], dcfg.prompt)
    tokenized = []
    for s in samples:
        try:
            tokenized.append(stok(s))
        except ValueError as e:
            if policy.raises:
                raise ValueError(f"{episodes[s.episode].root}: episode {episodes[s.episode].episode_index}: {e}") from None
            policy.skipped["too_long"] += 1
    if dcfg.workers > 0:  # loader workers decode each step's frames (data/frames.py LazyFrames)
        frames = LazyFrames(paths, dcfg.image_size)
    else:
        frames = decode_frames(paths, dcfg.image_size, dcfg.load_workers)
    return VLNData(tokenized, frames, tokenizer, stok, len(episodes), policy.summary())
