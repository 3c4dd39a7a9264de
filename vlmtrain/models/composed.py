"""A composed VLM (nanoVLM style): HF SigLIP vision encoder + pixel-shuffle projector + HF causal LM.

It implements the three calls every vlmtrain model exposes (see ``models/protocol.py``), so frame
de-duplication, packing and caching live outside the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

from vlmtrain.models.loss import labelled_cross_entropy
from vlmtrain.models.projector import PixelShuffleProjector

WEIGHTS = "model.safetensors"
META = "vlm_config.json"
# Pixel normalisation of SigLIP: x / 255 -> (x - 0.5) / 0.5
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


class ComposedVLM(nn.Module):
    """Vision encoder, projector and causal LM behind ``encode_images`` / ``embed`` / ``forward_lm``."""

    def __init__(
        self,
        vision: SiglipVisionModel,
        projector: PixelShuffleProjector,
        lm: nn.Module,
        image_token_id: int,
        max_frame_slots: int = 0,
        history_tokens: int = 0,
    ):
        super().__init__()
        # History frames (slot age > 0) are average-pooled to this many tokens (0: not pooled), the
        # NaVid/StreamVLN trade: the current view keeps its detail, older views stay cheap.
        self.history_tokens = history_tokens
        self.vision = vision
        self.projector = projector
        self.lm = lm
        self.image_token_id = image_token_id
        # Learned embedding of a frame's age (0 = current, 1 = newest history ...): tells the LM which
        # frame is which without spending text tokens on it.
        self.frame_age = nn.Embedding(max_frame_slots, projector.out_dim) if max_frame_slots else None
        if self.frame_age is not None:
            nn.init.zeros_(self.frame_age.weight)

    # The encoder / projector split (``encode_images = project(encode_vision(.))``) lets the feature
    # cache store vision-encoder features while the projector still trains.
    supports_split = True

    # -- the three calls -------------------------------------------------------------------------
    def encode_images(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        """uint8 or float pixels (N, 3, H, W) -> visual tokens (N, K, D_lm), one row block per frame."""
        return self.project(self.encode_vision(pixels_NCHW))

    def encode_vision(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, H, W) -> vision-encoder features (N, P, D_vision), before the projector."""
        if pixels_NCHW.dtype == torch.uint8:
            pixels_NCHW = pixels_NCHW.float().div_(255.0)
        x = (pixels_NCHW - PIXEL_MEAN) / PIXEL_STD
        return self.vision(pixel_values=x).last_hidden_state

    def project(self, feats_NPD: torch.Tensor) -> torch.Tensor:
        """Vision-encoder features (N, P, D_vision) -> visual tokens (N, K, D_lm)."""
        return self.projector(feats_NPD)

    def embed(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        slot_frames: torch.Tensor,
        slot_age: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Token embeddings with every image slot replaced by its frame's visual tokens.

        ``slot_frames[s]`` is the row of ``features`` (unique frames) that fills the s-th image slot,
        slots counted in row-major token order; ``slot_age[s]`` its age for the frame-age embedding.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        feats_SKD = features[slot_frames]
        if self.frame_age is not None and slot_age is not None:
            ages = slot_age.clamp(max=self.frame_age.num_embeddings - 1)
            feats_SKD = feats_SKD + self.frame_age(ages)[:, None, :]
        flat_TD = self._slot_tokens(feats_SKD, slot_age)
        mask = input_ids == self.image_token_id
        n_positions = int(mask.sum())
        if n_positions != flat_TD.shape[0]:
            raise ValueError(
                f"embed: {n_positions} image-token positions but {feats_SKD.shape[0]} slots give "
                f"{flat_TD.shape[0]} tokens of features"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), flat_TD.to(embeds.dtype))

    def _slot_tokens(self, feats_SKD: torch.Tensor, slot_age: Optional[torch.Tensor]) -> torch.Tensor:
        """Visual tokens of all slots in slot order (T, D); history slots pooled when configured."""
        s, k, d = feats_SKD.shape
        kh = self.history_tokens
        if slot_age is None or kh <= 0 or kh >= k:
            return feats_SKD.reshape(s * k, d)
        hist = slot_age > 0
        g, h = int(round(k**0.5)), int(round(kh**0.5))
        grid_NDgg = feats_SKD[hist].transpose(1, 2).reshape(-1, d, g, g)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid_NDgg, h).flatten(2).transpose(1, 2)
        current = feats_SKD[~hist]
        table = torch.cat([current.reshape(-1, d), pooled.reshape(-1, d)])
        # Gather index: slot s's tokens start at its row in `current` or (after all current tokens)
        # its row in `pooled`; tokens of one slot are consecutive.
        n_tok = torch.where(hist, kh, k)
        start = torch.where(hist, current.shape[0] * k + (hist.cumsum(0) - 1) * kh, ((~hist).cumsum(0) - 1) * k)
        offsets = torch.arange(int(n_tok.sum()), device=feats_SKD.device) - torch.repeat_interleave(
            n_tok.cumsum(0) - n_tok, n_tok)
        return table[torch.repeat_interleave(start, n_tok) + offsets]

    def forward_lm(
        self,
        inputs_embeds: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled positions (labels are unshifted, -100 ignored);
        logits only at labelled positions (``models/loss.py``)."""
        hidden = self.lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state
        return labelled_cross_entropy(hidden, self.lm.lm_head, labels)

    def next_token_logits(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the token after position ``last_index[b]`` of each row (B, V)."""
        hidden = self.lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.lm.lm_head(hidden[rows, last_index])

    # -- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Weights as safetensors plus every config needed to rebuild the model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "vision_config": self.vision.config.to_dict(),
            "lm_config": self.lm.config.to_dict(),
            "projector": {"in_dim": self.projector.in_dim, "out_dim": self.projector.out_dim,
                          "shuffle": self.projector.shuffle},
            "image_token_id": self.image_token_id,
            "max_frame_slots": self.frame_age.num_embeddings if self.frame_age is not None else 0,
            "history_tokens": self.history_tokens,
        }
        (directory / META).write_text(json.dumps(meta, indent=1))
        save_model(self, str(directory / WEIGHTS))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ComposedVLM":
        """Rebuild from :meth:`save_pretrained` output; raises if any weight is missing or unexpected."""
        directory = Path(directory)
        meta = json.loads((directory / META).read_text())
        vision = SiglipVisionModel(SiglipVisionConfig(**meta["vision_config"]))
        lm_meta = dict(meta["lm_config"])
        lm_cfg = AutoConfig.for_model(lm_meta.pop("model_type"), **lm_meta)
        lm = AutoModelForCausalLM.from_config(lm_cfg, attn_implementation="sdpa")
        model = cls(vision, PixelShuffleProjector(**meta["projector"]), lm, meta["image_token_id"],
                    meta["max_frame_slots"], meta.get("history_tokens", 0))
        load_model(model, str(directory / WEIGHTS), strict=True)
        return model

    # -- feature cache and FLOPs ------------------------------------------------------------------
    def feature_producers(self, split: bool) -> list[nn.Module]:
        """Modules whose weights produce the cached features: the encoder, plus the projector unless split."""
        return [self.vision] if split else [self.vision, self.projector]

    def feature_preprocess(self) -> dict:
        """Everything between a decoded uint8 frame and the encoder input (part of the cache identity)."""
        return {"model": "composed", "image_size": int(self.vision.config.image_size), "input": "uint8",
                "pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD}

    def vision_patches_per_frame(self) -> int:
        """Patches the encoder runs per frame."""
        return (int(self.vision.config.image_size) // int(self.vision.config.patch_size)) ** 2

    def tokens_per_image(self, image_size: int) -> int:
        """Visual tokens the current frame contributes at ``image_size``."""
        grid = image_size // self.vision.config.patch_size
        return (grid // self.projector.shuffle) ** 2

    def tokens_per_history_image(self, image_size: int) -> int:
        """Visual tokens a history frame contributes (pooled when ``history_tokens`` is set)."""
        k = self.tokens_per_image(image_size)
        return self.history_tokens if 0 < self.history_tokens < k else k


def build_composed_vlm(
    mcfg, image_size: int, vocab_size: int, image_token_id: int, pad_token_id: int, max_frame_slots: int
) -> ComposedVLM:
    """Build a randomly initialised composed VLM from a ``ModelConfig`` (configs stop here)."""
    vision_cfg = SiglipVisionConfig(
        hidden_size=mcfg.vision_hidden, intermediate_size=mcfg.vision_intermediate,
        num_hidden_layers=mcfg.vision_layers, num_attention_heads=mcfg.vision_heads,
        image_size=image_size, patch_size=mcfg.patch_size, vision_use_head=False,
    )
    vision = SiglipVisionModel(vision_cfg)
    common = dict(
        vocab_size=vocab_size, hidden_size=mcfg.lm_hidden, intermediate_size=mcfg.lm_intermediate,
        num_hidden_layers=mcfg.lm_layers, num_attention_heads=mcfg.lm_heads,
        num_key_value_heads=mcfg.lm_kv_heads, max_position_embeddings=mcfg.max_position,
        tie_word_embeddings=False, pad_token_id=pad_token_id,
    )
    if mcfg.lm_arch == "qwen3":
        common["head_dim"] = mcfg.lm_hidden // mcfg.lm_heads
    lm_cfg = AutoConfig.for_model(mcfg.lm_arch, **common)
    lm = AutoModelForCausalLM.from_config(lm_cfg, attn_implementation="sdpa")
    projector = PixelShuffleProjector(mcfg.vision_hidden, mcfg.lm_hidden, mcfg.pixel_shuffle)
    return ComposedVLM(vision, projector, lm, image_token_id, max_frame_slots if mcfg.frame_age_embedding else 0,
                       mcfg.history_tokens)
