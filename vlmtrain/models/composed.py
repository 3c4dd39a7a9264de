"""A composed VLM (nanoVLM style): HF SigLIP vision encoder + pixel-shuffle projector + HF causal LM.

It implements the model protocol (``models/protocol.py``) like every HF adapter, with a tokenizer
trained on the run's text and a minimal chat format of its own (``models/composed_chat.py``), so
data, frame de-duplication, packing, caching, checkpoints and evaluation never ask which it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

from vlmtrain.models.composed_chat import ChatFormat, load_tokenizer, save_tokenizer
from vlmtrain.models.loss import labelled_cross_entropy
from vlmtrain.models.parts import part_from_name
from vlmtrain.models.projector import PixelShuffleProjector
from vlmtrain.models.protocol import Encoded, FrameBatch, Turn, take_rows
from vlmtrain.models.shapes import TransformerShape, shape_from_hf_config

WEIGHTS = "model.safetensors"
META = "vlm_config.json"
# Pixel normalisation of SigLIP: x / 255 -> (x - 0.5) / 0.5
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
# Submodule name -> part (the frame-age embedding trains with the projector).
COMPOSED_PARTS = {"vision": "vision", "lm": "llm", "projector": "projector", "frame_age": "projector"}


class ComposedVLM(nn.Module):
    """Vision encoder, projector and causal LM behind the model protocol; ``tokenizer`` is the
    run's own (its ``<image>`` id is the image slot token)."""

    family = "composed"
    # The encoder / projector split (``encode_images = project(encode_vision(.))``) lets the feature
    # cache store vision-encoder features while the projector still trains.
    supports_split = True

    def __init__(
        self,
        vision: SiglipVisionModel,
        projector: PixelShuffleProjector,
        lm: nn.Module,
        tokenizer,
        max_frame_slots: int = 0,
        history_tokens: int = 0,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.chat = ChatFormat(tokenizer, self.tokens_per_frame)
        # History frames (slot age > 0) are average-pooled to this many tokens (0: not pooled), the
        # NaVid/StreamVLN trade: the current view keeps its detail, older views stay cheap.
        self.history_tokens = history_tokens
        self.vision = vision
        self.projector = projector
        self.lm = lm
        self.image_token_id = self.chat.image_id
        side = int(vision.config.image_size)
        self.frame_size = (side, side)
        # Learned embedding of a frame's age (0 = current, 1 = newest history ...): tells the LM which
        # frame is which without spending text tokens on it.
        self.frame_age = nn.Embedding(max_frame_slots, projector.out_dim) if max_frame_slots else None
        if self.frame_age is not None:
            nn.init.zeros_(self.frame_age.weight)

    # -- inputs ----------------------------------------------------------------------------------
    def prepare_frames(self, pixels_NCHW: torch.Tensor) -> FrameBatch:
        """uint8 frames (N, 3, S, S) as they are: normalisation runs on the device, in ``encode_vision``
        (a quarter of the bytes to move)."""
        if pixels_NCHW.dtype != torch.uint8 or pixels_NCHW.ndim != 4 or tuple(pixels_NCHW.shape[2:]) != self.frame_size:
            raise ValueError(f"composed: prepare_frames wants uint8 (N, 3, {self.frame_size[0]}, {self.frame_size[1]}) "
                             f"frames, got {pixels_NCHW.dtype} {tuple(pixels_NCHW.shape)}")
        return FrameBatch(pixels_NCHW)

    def tokens_per_frame(self, age: int = 0) -> int:
        """(side / patch / shuffle)^2 tokens for the current frame; ``history_tokens`` for older ones
        when history frames are pooled."""
        grid = self.frame_size[0] // int(self.vision.config.patch_size)
        k = (grid // self.projector.shuffle) ** 2
        return self.history_tokens if age > 0 and 0 < self.history_tokens < k else k

    def encode_conversation(self, turns: list[Turn]) -> Encoded:
        """The minimal chat format of ``models/composed_chat.py``; each image slot expands to
        ``tokens_per_frame(age)`` image tokens (the conversation's last image is the current frame)."""
        return self.chat(turns)

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """None: the LM counts 1D positions itself."""
        return None

    def packed_position_ids(self, input_ids: torch.Tensor, doc_lengths) -> None:
        """None: the batch's 1D positions, restarting per document, are the right ones."""
        return None

    # -- the three calls -------------------------------------------------------------------------
    def encode_images(self, frames: FrameBatch) -> torch.Tensor:
        """Frames (uint8 or float pixels (N, 3, H, W)) -> visual tokens (N, K, D_lm), one row block per frame."""
        return self.project(self.encode_vision(frames))

    def encode_vision(self, frames: FrameBatch) -> torch.Tensor:
        """Frames -> vision-encoder features (N, P, D_vision), before the projector."""
        pixels_NCHW = frames.pixels
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
        feats_SKD = take_rows(features, slot_frames)
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
        return take_rows(table, torch.repeat_interleave(start, n_tok) + offsets)

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

    def output_embeddings(self) -> nn.Module:
        """The LM head."""
        return self.lm.lm_head

    # -- parts -----------------------------------------------------------------------------------
    def part_of(self, param_name: str) -> str:
        """vision: ``vision.*``; llm: ``lm.*``; projector: the projector and the frame-age embedding.
        Matches path components, so DDP / FSDP / compile prefixes do not matter."""
        return part_from_name(param_name, COMPOSED_PARTS, self.family)

    def unreachable_trainable(self) -> list[str]:
        """None: every parameter reaches the loss."""
        return []

    # -- persistence -----------------------------------------------------------------------------
    def save_final(self, directory: str | Path) -> None:
        """Weights, configs and the tokenizer: everything ``from_pretrained`` needs."""
        self.save_pretrained(directory)
        save_tokenizer(self.tokenizer, directory)

    def save_pretrained(self, directory: str | Path) -> None:
        """Weights as safetensors plus every config needed to rebuild the model (not the tokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "vision_config": self.vision.config.to_dict(),
            "lm_config": self.lm.config.to_dict(),
            "projector": {"in_dim": self.projector.in_dim, "out_dim": self.projector.out_dim,
                          "shuffle": self.projector.shuffle},
            "max_frame_slots": self.frame_age.num_embeddings if self.frame_age is not None else 0,
            "history_tokens": self.history_tokens,
        }
        (directory / META).write_text(json.dumps(meta, indent=1))
        save_model(self, str(directory / WEIGHTS))

    @classmethod
    def from_pretrained(cls, directory: str | Path, tokenizer=None) -> "ComposedVLM":
        """Rebuild from :meth:`save_final` output (``tokenizer``: the one to use instead of the
        directory's); raises if any weight is missing or unexpected."""
        directory = Path(directory)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(directory)
        meta = json.loads((directory / META).read_text())
        vision = SiglipVisionModel(SiglipVisionConfig(**meta["vision_config"]))
        lm_meta = dict(meta["lm_config"])
        lm_cfg = AutoConfig.for_model(lm_meta.pop("model_type"), **lm_meta)
        lm = AutoModelForCausalLM.from_config(lm_cfg, attn_implementation="sdpa")
        model = cls(vision, PixelShuffleProjector(**meta["projector"]), lm, tokenizer,
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

    def visual_grid(self) -> tuple[int, int]:
        """(rows, cols) of the current frame's tokens: the patch grid after the pixel shuffle, row-major."""
        side = self.frame_size[0] // int(self.vision.config.patch_size) // self.projector.shuffle
        return side, side

    @property
    def spatial_concat_width(self) -> int:
        """Channels a spatial branch concatenates to the vision features before the projector (0: none)."""
        return self.projector.in_dim - int(self.vision.config.hidden_size)

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the vision encoder's patches, row-major (what ``encode_vision`` returns)."""
        side = int(self.vision.config.image_size) // int(self.vision.config.patch_size)
        return side, side

    def vision_patches_per_frame(self) -> int:
        """Patches the encoder runs per frame."""
        return (int(self.vision.config.image_size) // int(self.vision.config.patch_size)) ** 2

    def transformer_shapes(self) -> tuple[TransformerShape, TransformerShape]:
        """(causal LM, SigLIP encoder) shapes from their configs."""
        return shape_from_hf_config(self.lm.config), shape_from_hf_config(self.vision.config)


def build_composed_vlm(mcfg, image_size: int, tokenizer, max_frame_slots: int) -> ComposedVLM:
    """Build a randomly initialised composed VLM from a ``ModelConfig`` around ``tokenizer``
    (configs stop here)."""
    vision_cfg = SiglipVisionConfig(
        hidden_size=mcfg.vision_hidden, intermediate_size=mcfg.vision_intermediate,
        num_hidden_layers=mcfg.vision_layers, num_attention_heads=mcfg.vision_heads,
        image_size=image_size, patch_size=mcfg.patch_size, vision_use_head=False,
    )
    vision = SiglipVisionModel(vision_cfg)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=mcfg.lm_hidden, intermediate_size=mcfg.lm_intermediate,
        num_hidden_layers=mcfg.lm_layers, num_attention_heads=mcfg.lm_heads,
        num_key_value_heads=mcfg.lm_kv_heads, max_position_embeddings=mcfg.max_position,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
    )
    if mcfg.lm_arch == "qwen3":
        common["head_dim"] = mcfg.lm_hidden // mcfg.lm_heads
    lm_cfg = AutoConfig.for_model(mcfg.lm_arch, **common)
    lm = AutoModelForCausalLM.from_config(lm_cfg, attn_implementation="sdpa")
    # concat fusion of a spatial branch (models/spatial.py): its features join the vision features'
    # channels before the pixel shuffle, so the projector reads vision_hidden more channels.
    concat = mcfg.vision_hidden if mcfg.spatial_encoder and mcfg.spatial_fusion == "concat" else 0
    projector = PixelShuffleProjector(mcfg.vision_hidden + concat, mcfg.lm_hidden, mcfg.pixel_shuffle)
    return ComposedVLM(vision, projector, lm, tokenizer, max_frame_slots if mcfg.frame_age_embedding else 0,
                       mcfg.history_tokens)
