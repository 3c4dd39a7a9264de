"""The shared shape of every HF VLM adapter (Qwen2/2.5/3-VL, Idefics3/SmolVLM, LLaVA).

An adapter wraps a ``transformers`` ``...ForConditionalGeneration`` model loaded from a local
directory and splits it into the three calls of ``models/protocol.py``:

- ``encode_images(pixels, meta)``: pixels of N frames -> visual tokens ``(N, K, D)``; K is the same
  for every frame because a run resizes all frames to one size (``frame_size``), which keeps frame
  de-duplication, the feature cache and packing family-agnostic;
- ``embed(input_ids, features, slot_frames)``: text embeddings with every image slot's placeholder
  tokens replaced by ``features[slot_frames[s]]``;
- ``forward_lm(inputs_embeds, labels, attention_mask, position_ids)``: mean next-token loss.

Inputs are built by hand from the family's tokenizer and PIL image processor: ``AutoProcessor`` needs
torchvision for Qwen-VL and SmolVLM, which vlmtrain never depends on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch
from PIL import Image
from torch import nn

from vlmtrain.models.export import export_merged
from vlmtrain.models.loss import labelled_cross_entropy
from vlmtrain.models.parts import part_from_name
from vlmtrain.models.protocol import (IGNORE_INDEX, IMAGE_PLACEHOLDER, Encoded, FrameBatch, Turn, square_grid,
                                     take_rows)
from vlmtrain.models.shapes import TransformerShape, shape_from_hf_config

__all__ = ["HFVLMAdapter", "IGNORE_INDEX", "IMAGE_PLACEHOLDER", "Encoded", "FrameBatch", "Turn"]

class HFVLMAdapter(nn.Module):
    """Base of the HF adapters. Subclasses set ``family`` and implement the abstract methods.

    ``self.hf`` is the wrapped HF model (``export`` saves it with ``save_pretrained``),
    ``self.tokenizer`` its tokenizer, ``self.image_processor`` its PIL image processor.
    """

    family: ClassVar[str] = ""
    # Two-tower families (Idefics3, LLaVA): the HF submodules (attributes of ``hf.model``) of the vision
    # tower, the projector and the text model. The split-model methods below (``encode_images``,
    # ``project``, ``forward_lm``, ``feature_producers``, ``part_of``) work from this table; families
    # with another structure (Qwen-VL) override them.
    TOWERS: ClassVar[dict[str, str]] = {}
    # True when the adapter implements ``encode_vision`` + ``project`` (= ``encode_images``), so the
    # feature cache can hold vision-encoder features while the projector trains.
    supports_split: ClassVar[bool] = False

    def __init__(self, hf: nn.Module, tokenizer, image_processor, frame_size: tuple[int, int]):
        super().__init__()
        self.hf = hf
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.frame_size = frame_size  # (height, width) every frame is resized to
        # Batches are right-padded with the pad id (masked and unlabelled, so any id but the image
        # token works); eos is the usual stand-in for tokenizers that have none.
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == self.image_token_id:
            raise ValueError(f"{self.family}: the tokenizer needs a pad (or eos) token other than the image token")

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, frame_size: Optional[tuple[int, int]] = None,
                        dtype: torch.dtype = torch.float32) -> "HFVLMAdapter":
        """Load model, tokenizer and PIL image processor from a local directory (never downloads)."""
        raise NotImplementedError

    # -- inputs ----------------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> FrameBatch:
        """PIL images -> a FrameBatch; every image is resized to ``frame_size`` first."""
        raise NotImplementedError

    def prepare_frames(self, pixels_NCHW: torch.Tensor) -> FrameBatch:
        """uint8 RGB frames (N, 3, H, W), as the data pipeline decodes them once at start, -> the
        family's FrameBatch through ``preprocess`` (so training sees exactly what inference sees).
        Frames already at ``frame_size`` are not resized again."""
        if pixels_NCHW.dtype != torch.uint8 or pixels_NCHW.ndim != 4 or pixels_NCHW.shape[1] != 3:
            raise ValueError(f"{self.family}: prepare_frames wants uint8 (N, 3, H, W) frames, got "
                             f"{pixels_NCHW.dtype} {tuple(pixels_NCHW.shape)}")
        frames_NHWC = pixels_NCHW.permute(0, 2, 3, 1).cpu().numpy()
        return self.preprocess([Image.fromarray(frame) for frame in frames_NHWC])

    def tokens_per_frame(self, age: int = 0) -> int:
        """K: visual tokens one frame becomes in the LM (after merging / pixel shuffle), whatever its age."""
        raise NotImplementedError

    def encode_conversation(self, turns: Sequence[Turn]) -> Encoded:
        """The family's chat format with each ``<image>`` expanded to its placeholder token sequence
        (exactly ``tokens_per_frame()`` image-pad tokens per image plus the family's wrapper tokens)."""
        raise NotImplementedError

    # -- the three calls -------------------------------------------------------------------------
    def encode_images(self, frames: FrameBatch) -> torch.Tensor:
        """Frames -> visual tokens (N, K, D_lm): ``project(encode_vision(frames))``."""
        return self.project(self.encode_vision(frames))

    def _tower(self, role: str) -> nn.Module:
        if role not in self.TOWERS:
            raise NotImplementedError(f"{self.family}: no {role} submodule in TOWERS")
        return getattr(self.hf.model, self.TOWERS[role])

    def encode_vision(self, frames: FrameBatch) -> torch.Tensor:
        """Vision-encoder features before the projector (adapters with ``supports_split``)."""
        raise NotImplementedError(f"{self.family}: the vision tower and its projector are not split")

    def project(self, feats_NPD: torch.Tensor) -> torch.Tensor:
        """Vision-encoder features (N, P, D_vision) -> visual tokens (N, K, D_lm) through the projector."""
        if not self.supports_split:
            raise NotImplementedError(f"{self.family}: the vision tower and its projector are not split")
        return self._tower("projector")(feats_NPD)

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor, slot_frames: torch.Tensor,
              slot_age: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with each image slot's pad tokens replaced by ``features[slot_frames]``
        (every slot has K tokens whatever its age: ``slot_age`` is not used)."""
        embeds = self.hf.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        flat_TD = take_rows(features, slot_frames).reshape(-1, features.shape[-1])
        if int(mask.sum()) != flat_TD.shape[0]:
            raise ValueError(f"{self.family}: {int(mask.sum())} image-pad positions but "
                             f"{slot_frames.numel()} slots x {features.shape[1]} tokens = {flat_TD.shape[0]}")
        return embeds.masked_scatter(mask.unsqueeze(-1), flat_TD.to(embeds.dtype))

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     frames: Optional[FrameBatch] = None, slot_frames: Optional[torch.Tensor] = None
                     ) -> Optional[torch.Tensor]:
        """Position ids for ``forward_lm``: None for 1D RoPE (the LM counts positions itself),
        (3, B, L) MRoPE positions computed per sample for the Qwen family."""
        return None

    def packed_position_ids(self, input_ids: torch.Tensor, doc_lengths: Sequence[Sequence[int]]
                            ) -> Optional[torch.Tensor]:
        """Positions of packed rows (several documents per row): None for 1D RoPE (the batch's
        per-document 1D positions are used); the Qwen family computes MRoPE per document."""
        return None

    def forward_lm(self, inputs_embeds: torch.Tensor, labels: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None,
                   position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled positions (labels unshifted, -100 ignored):
        the text model, then the LM head at the labelled positions only (``models/loss.py``).
        ``attention_mask``: (B, L) padding mask, or a (B, 1, L, L) additive mask for packed rows."""
        out = self._tower("lm")(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=False)
        return labelled_cross_entropy(out.last_hidden_state, self.hf.lm_head, labels)

    # -- feature cache and FLOPs ----------------------------------------------------------------
    def feature_producers(self, split: bool) -> list[nn.Module]:
        """Modules whose weights produce the cached features: the vision tower, plus the projector
        unless split."""
        vision = self._tower("vision")
        return [vision] if split else [vision, self._tower("projector")]

    def feature_preprocess(self) -> dict:
        """Everything between a decoded uint8 frame and the encoder input: family, frame size and the
        image processor's settings (part of the feature cache's identity)."""
        return {"family": self.family, "frame_size": list(self.frame_size),
                "image_processor": json.loads(self.image_processor.to_json_string())}

    def visual_grid(self) -> tuple[int, int]:
        """(rows, cols) of a frame's visual tokens: square frames give a square row-major grid (LLaVA's
        ``full`` strategy, with its class token, has none: ValueError). Qwen-VL overrides it."""
        return square_grid(self.tokens_per_frame(0), self.family)

    def vision_patches_per_frame(self) -> int:
        """Patches the vision tower runs per frame (the vision cost unit of packing and FLOPs)."""
        raise NotImplementedError

    def output_embeddings(self) -> nn.Module:
        """The HF model's LM head (``forward_lm`` computes its logits with it)."""
        return self.hf.get_output_embeddings()

    def unreachable_trainable(self) -> list[str]:
        """Trainable parameters no loss can reach (none, unless a family says otherwise)."""
        return []

    def transformer_shapes(self) -> tuple[TransformerShape, TransformerShape]:
        """(LM, vision tower) shapes from the wrapped HF model's text and vision configs."""
        return shape_from_hf_config(self.hf.config.text_config), shape_from_hf_config(self.hf.config.vision_config)

    def save_final(self, directory: str | Path) -> None:
        """A plain HF checkpoint with LoRA merged (``models/export.py``), loadable by transformers."""
        export_merged(self, directory, overwrite=True)

    def hf_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                frames: FrameBatch) -> torch.Tensor:
        """The wrapped HF model's own ``forward(...).loss`` on the same inputs (``frames`` hold one
        row per image slot, in order): the reference the adapter tests compare against."""
        raise NotImplementedError

    # -- parts -----------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        """Id of the image-pad token that ``embed`` fills (``config.image_token_id``: the LM was
        trained with it; each adapter checks its tokenizer agrees)."""
        return int(self.hf.config.image_token_id)

    def part_of(self, param_name: str) -> str:
        """Part of a parameter name of this adapter: vision, projector or llm (freeze flags, lr groups),
        from the ``TOWERS`` submodule its name passes through (``lm_head`` is the llm's)."""
        parts = {self.TOWERS[role]: part for role, part in (("vision", "vision"), ("projector", "projector"),
                                                             ("lm", "llm")) if role in self.TOWERS}
        return part_from_name(param_name, {**parts, "lm_head": "llm"}, self.family)
