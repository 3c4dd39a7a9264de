"""The model seam: image encoding is separate from the language model.

Packing, frame de-duplication, the feature cache and rank balancing live outside the model and only
use these three calls, so they work the same for every model family.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class VLMProtocol(Protocol):
    """What the trainer needs from a model."""

    def encode_images(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        """Pixels of N unique frames -> visual tokens (N, K, D), one row block per frame (cacheable when frozen)."""

    def embed(
        self, input_ids: torch.Tensor, features: torch.Tensor, slot_frames: torch.Tensor,
        slot_age: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Token embeddings with image slots filled from ``features[slot_frames]``."""

    def forward_lm(
        self, inputs_embeds: torch.Tensor, labels: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Language-model loss on the given embeddings."""
