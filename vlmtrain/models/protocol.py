"""THE model surface: what every vlmtrain model implements, the composed VLM and every HF adapter.

Image encoding is separate from the language model. Data, features, train and tools call only what
is listed here, so frame de-duplication, the feature cache, packing, rank balancing, checkpoints and
the closed-loop evaluator work the same for every family and never ask which one they hold.

A step goes: decoded uint8 frames -> ``prepare_frames`` (the family's preprocessing, on the loader
thread) -> ``encode_images`` (each unique frame once, or the feature cache) -> ``embed`` (image slots
of the token ids filled with visual tokens) -> ``forward_lm`` (loss at the labelled positions).
``tests/models/test_protocol.py`` checks every family against this protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

IGNORE_INDEX = -100  # label of every position that is not a target
IMAGE_PLACEHOLDER = "<image>"  # one per image in a conversation turn's text


def take_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` along dim 0 (``index`` 1-D, repeats allowed) with a deterministic backward.

    Every ``embed`` gathers visual tokens this way: one unique frame fills the slots of many samples
    (a history frame is shared by up to eight later decisions), so the backward sums many rows into
    one. Advanced indexing's backward (``index_put_`` with accumulation) sums those rows in a
    thread-dependent order on a multi-threaded CPU, which made two identical default runs drift
    apart (``docs/reproducibility.md``); the embedding backward used here sums them in index order on
    CPU and sorts on CUDA, so the gradient is the same bits on every run."""
    flat = table.reshape(table.shape[0], math.prod(table.shape[1:]))  # -1 is ambiguous for 0 rows
    return torch.nn.functional.embedding(index, flat).reshape(index.shape[0], *table.shape[1:])


def square_grid(tokens: int, family: str) -> tuple[int, int]:
    """(g, g) for ``tokens`` = g * g visual tokens laid row-major on a square grid; ValueError otherwise."""
    g = math.isqrt(tokens)
    if g * g != tokens:
        raise ValueError(f"{family}: {tokens} visual tokens per frame are not a square grid")
    return g, g


@dataclass(frozen=True)
class Turn:
    """One conversation turn; ``text`` holds one ``<image>`` placeholder per image of the turn."""

    role: str  # "system" | "user" | "assistant"
    text: str


@dataclass
class Encoded:
    """A tokenised conversation: ``labels`` are IGNORE_INDEX except on assistant answers (and their end
    token); ``num_images`` slots appear in token order."""

    input_ids: list[int]
    labels: list[int]
    num_images: int


@dataclass
class FrameBatch:
    """Preprocessed frames: ``pixels`` has a leading frame axis N (indexable, de-duplicable, cacheable);
    ``meta`` holds per-frame tensors with the same leading axis (e.g. Qwen ``image_grid_thw`` (N, 3))."""

    pixels: torch.Tensor
    meta: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, rows: torch.Tensor) -> "FrameBatch":
        """The frames at ``rows`` (a de-duplicated subset, in that order)."""
        return FrameBatch(self.pixels[rows], {k: v[rows] for k, v in self.meta.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "FrameBatch":
        """The same frames on ``device`` (pixels and every meta tensor)."""
        return FrameBatch(self.pixels.to(device, non_blocking=non_blocking),
                          {k: v.to(device, non_blocking=non_blocking) for k, v in self.meta.items()})


@runtime_checkable
class VLM(Protocol):
    """What the trainer needs from a model (an ``nn.Module``).

    Attributes:
        family: the family's name, for messages and run records (never branched on outside models/).
        frame_size: (height, width) every frame is decoded to before ``prepare_frames``.
        tokenizer: the model's tokenizer; its pad id (never the image token) pads batches.
        supports_split: ``encode_images == project(encode_vision(.))``, so a feature cache may hold
            vision-encoder features while the projector trains.
    """

    family: str
    frame_size: tuple[int, int]
    tokenizer: Any
    supports_split: bool

    # -- inputs ----------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        """Id of the token ``embed`` replaces by visual tokens (batches count visual tokens with it)."""

    def prepare_frames(self, pixels_NCHW: torch.Tensor) -> FrameBatch:
        """uint8 RGB frames (N, 3, H, W) at ``frame_size`` -> the encoder's input (loader side)."""

    def tokens_per_frame(self, age: int = 0) -> int:
        """Visual tokens an image slot puts in the LM sequence; ``age`` 0 is a sample's last (current)
        frame, 1 the one before it, ...; ``tokens_per_frame(0)`` is also what the projector emits."""

    def vision_patches_per_frame(self) -> int:
        """Patches the vision tower runs per frame (the vision cost unit of packing and FLOPs)."""

    def visual_grid(self) -> tuple[int, int]:
        """(rows, cols) of the ``tokens_per_frame(0)`` visual tokens, which come row-major (a spatial
        branch lays its features on them: ``models/spatial.py``)."""

    def encode_conversation(self, turns: Sequence[Turn]) -> Encoded:
        """The model's chat format, each ``<image>`` expanded to its slot's image-token sequence;
        labels on assistant answers and their end token only."""

    # -- the three calls -------------------------------------------------------------------------
    def encode_images(self, frames: FrameBatch) -> torch.Tensor:
        """Frames -> visual tokens (N, K, D), one row block per frame (cacheable when frozen)."""

    def encode_vision(self, frames: FrameBatch) -> torch.Tensor:
        """Frames -> vision-encoder features before the projector (only when ``supports_split``)."""

    def project(self, feats_NPD: torch.Tensor) -> torch.Tensor:
        """Vision-encoder features -> visual tokens (only when ``supports_split``)."""

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor, slot_frames: torch.Tensor,
              slot_age: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with the s-th image slot filled from ``features[slot_frames[s]]``;
        ``slot_age[s]`` is that slot's age (models that use it: pooling, frame-age embedding)."""

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """Positions of padded rows for ``forward_lm``; None: the LM counts 1D positions itself."""

    def packed_position_ids(self, input_ids: torch.Tensor, doc_lengths: Sequence[Sequence[int]]
                            ) -> Optional[torch.Tensor]:
        """Positions of packed rows (each document from 0); None: the batch's 1D per-document positions."""

    def forward_lm(self, inputs_embeds: torch.Tensor, labels: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None,
                   position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled positions (labels unshifted, -100 ignored),
        logits computed at the labelled positions only, through ``output_embeddings()``."""

    def output_embeddings(self) -> nn.Module:
        """The LM head ``forward_lm`` computes its logits with (the evaluator reads them off it)."""

    # -- parts, cache, FLOPs, saving -------------------------------------------------------------
    def part_of(self, param_name: str) -> str:
        """Which part a parameter (or module) name belongs to: vision, projector or llm."""

    def unreachable_trainable(self) -> list[str]:
        """Trainable parameters no loss can reach (data parallelism must be told)."""

    def feature_producers(self, split: bool) -> list[nn.Module]:
        """Modules whose weights produce the cached features (vision tower, plus projector unless split)."""

    def feature_preprocess(self) -> dict:
        """Everything between a decoded uint8 frame and the encoder input (part of the cache identity)."""

    def transformer_shapes(self) -> tuple[Any, Any]:
        """(LM, vision tower) ``models.shapes.TransformerShape``: what the FLOPs model counts."""

    def save_final(self, directory: str | Path) -> None:
        """The trained model as a self-contained directory (weights, configs, tokenizer) that
        ``models.registry.load_final`` reads back; HF families: a plain HF checkpoint, LoRA merged."""
