"""LLaVA adapter: ``LlavaForConditionalGeneration`` (SigLIP or CLIP vision tower, Llama or Qwen2 LM).

Chat format (simple, documented, not any checkpoint's official template), ``\\n`` a newline::

    {bos}[{system}\\n]USER: {user}\\nASSISTANT: {answer}{eos}USER: {user}\\nASSISTANT: {answer}{eos}

``{bos}`` only when the tokenizer has one (Qwen2 has none); the system line only when a system turn
exists; nothing separates ``{eos}`` and the next ``USER:``. Labels cover `` {answer}{eos}``
only. Each ``<image>`` in a user turn becomes K image-pad tokens (no wrapper tokens), K following the
config's ``vision_feature_select_strategy`` ("default" drops the first vision token, "full" keeps all;
HF drops it even for SigLIP, which has no CLS token, so we count the same way).

The module also holds the small helpers both HF adapters of this package share (frame resizing, the
token/label buffer, the labelled-only causal LM loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

from vlmtrain.models.hf_base import IGNORE_INDEX, IMAGE_PLACEHOLDER, Encoded, FrameBatch, HFVLMAdapter, Turn


# -- shared helpers ------------------------------------------------------------------------------
def resize_frames(images: Sequence, frame_size: tuple[int, int], resample: int) -> list[Image.Image]:
    """RGB copies of ``images`` resized to ``frame_size`` (height, width) with the processor's filter.

    Resizing here (not in the processor) makes the "every frame has one size" rule explicit and
    independent of each processor's own size/crop logic; PIL returns an unchanged copy when the
    image already has that size, so a processor's later same-size resize is a no-op.
    """
    height, width = frame_size
    return [img.convert("RGB").resize((width, height), resample=Image.Resampling(int(resample)))
            for img in images]


def special_token_id(tokenizer, token: str) -> int:
    """Id of a token that must exist in the vocabulary as a single token (raises a clear error)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"tokenizer has no token {token!r}")
    return int(token_id)


@dataclass
class TokenBuffer:
    """Token ids with parallel labels; ``train=True`` marks the added ids as supervised targets."""

    tokenizer: object
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def add_ids(self, ids: Sequence[int], train: bool = False) -> None:
        """Append ids; labelled with themselves when ``train``, else IGNORE_INDEX."""
        self.ids.extend(ids)
        self.labels.extend(ids if train else [IGNORE_INDEX] * len(ids))

    def add_text(self, text: str, train: bool = False,
                 image_ids: Optional[Callable[[], list[int]]] = None) -> int:
        """Tokenise ``text`` (no special tokens added); each ``<image>`` becomes ``image_ids()``.

        Image ids are inserted directly instead of tokenising thousands of placeholder strings; the
        text pieces between them are tokenised separately, which matches HF because added special
        tokens split the text before BPE anyway. Returns the number of images inserted.
        """
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) > 1 and (image_ids is None or train):
            raise ValueError(f"{IMAGE_PLACEHOLDER} is only allowed in user/system turns: {text!r}")
        for i, piece in enumerate(pieces):
            if i > 0:
                self.add_ids(image_ids())
            if piece:
                self.add_ids(self.tokenizer.encode(piece, add_special_tokens=False), train)
        return len(pieces) - 1

    def encoded(self, num_images: int) -> Encoded:
        """The buffer as an ``Encoded``."""
        return Encoded(input_ids=list(self.ids), labels=list(self.labels), num_images=num_images)


# -- the adapter ---------------------------------------------------------------------------------
class LlavaAdapter(HFVLMAdapter):
    """``LlavaForConditionalGeneration`` split into encode_images / embed / forward_lm.

    Frames must have the vision tower's own ``image_size``: HF LLaVA does not interpolate position
    embeddings, so another size would not run through ``hf_loss`` either.
    """

    family = "llava"
    supports_split = True
    TOWERS = {"vision": "vision_tower", "projector": "multi_modal_projector", "lm": "language_model"}

    def __init__(self, hf: LlavaForConditionalGeneration, tokenizer, image_processor,
                 frame_size: tuple[int, int]):
        super().__init__(hf, tokenizer, image_processor, tuple(frame_size))
        cfg = hf.config
        side = cfg.vision_config.image_size
        if tuple(frame_size) != (side, side):
            raise ValueError(f"llava: frame_size {tuple(frame_size)} must equal the vision tower's "
                             f"image_size ({side}, {side}); HF LLaVA cannot interpolate positions")
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"llava: unknown vision_feature_select_strategy "
                             f"{cfg.vision_feature_select_strategy!r}")
        tower = hf.model.vision_tower
        # transformers 5 puts the embeddings on the tower itself, 4.x under tower.vision_model.
        embeddings = tower.embeddings if hasattr(tower, "embeddings") else tower.vision_model.embeddings
        # num_positions counts the CLS token for CLIP and not for SigLIP, which is exactly the
        # number of vision tokens the tower outputs per frame.
        self._k = embeddings.num_positions - (1 if cfg.vision_feature_select_strategy == "default" else 0)
        if special_token_id(tokenizer, IMAGE_PLACEHOLDER) != cfg.image_token_id:
            raise ValueError(f"llava: tokenizer's {IMAGE_PLACEHOLDER} id does not match "
                             f"config.image_token_id {cfg.image_token_id}")
        if tokenizer.eos_token_id is None:
            raise ValueError("llava: the tokenizer needs an eos token (it ends every answer)")

    @classmethod
    def from_pretrained(cls, path: str | Path, frame_size: Optional[tuple[int, int]] = None,
                        dtype: torch.dtype = torch.float32) -> "LlavaAdapter":
        """Load model, tokenizer and PIL image processor from a local directory (never downloads).

        ``frame_size`` defaults to (and must equal) the vision tower's square ``image_size``.
        """
        hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
        side = hf.config.vision_config.image_size
        return cls(hf, tokenizer, image_processor, frame_size or (side, side))

    # -- inputs ----------------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> FrameBatch:
        """PIL images -> FrameBatch of normalised pixels (N, 3, H, W) at ``frame_size``."""
        height, width = self.frame_size
        if len(images) == 0:
            return FrameBatch(torch.empty(0, 3, height, width))
        frames = resize_frames(images, self.frame_size, self.image_processor.resample)
        # Resizing is done; a CLIP processor would otherwise also centre-crop.
        out = self.image_processor(frames, do_resize=False, do_center_crop=False, return_tensors="pt")
        return FrameBatch(out["pixel_values"].reshape(len(images), 3, height, width))

    def tokens_per_frame(self, age: int = 0) -> int:
        """K: vision tokens per frame after the select strategy (the projector keeps the count)."""
        return self._k

    def encode_conversation(self, turns: Sequence[Turn]) -> Encoded:
        """Tokens and labels in the module's chat format (see the module docstring)."""
        buf = TokenBuffer(self.tokenizer)
        image_ids = lambda: [self.image_token_id] * self._k  # noqa: E731
        if self.tokenizer.bos_token_id is not None:
            buf.add_ids([self.tokenizer.bos_token_id])
        num_images = 0
        for turn in turns:
            if turn.role == "system":
                num_images += buf.add_text(f"{turn.text}\n", image_ids=image_ids)
            elif turn.role == "user":
                num_images += buf.add_text(f"USER: {turn.text}\n", image_ids=image_ids)
            elif turn.role == "assistant":
                buf.add_text("ASSISTANT:")
                buf.add_text(f" {turn.text}", train=True)
                buf.add_ids([self.tokenizer.eos_token_id], train=True)
            else:
                raise ValueError(f"llava: unknown role {turn.role!r}")
        return buf.encoded(num_images)

    # -- the three calls -------------------------------------------------------------------------
    def encode_vision(self, frames: FrameBatch) -> torch.Tensor:
        """Frames -> (N, K, D_vision): vision tower hidden states of ``vision_feature_layer`` (a list of
        layers is concatenated on the feature axis) after the strategy's crop, before the projector."""
        cfg = self.hf.config
        tower = self.hf.model.vision_tower
        pixels = frames.pixels.to(device=self.hf.device, dtype=self.hf.dtype)
        hidden_states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        layers = cfg.vision_feature_layer
        selected = [hidden_states[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if cfg.vision_feature_select_strategy == "default":
            selected = [h[:, 1:] for h in selected]
        return torch.cat(selected, dim=-1)

    def hf_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                frames: FrameBatch) -> torch.Tensor:
        """HF ``forward(...).loss``; LLaVA takes all images of the batch flat, (N, 3, H, W) in order."""
        pixel_values = frames.pixels if frames.pixels.shape[0] else None
        out = self.hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                      labels=labels, use_cache=False)
        return out.loss

    # -- parts -----------------------------------------------------------------------------------
    def unreachable_trainable(self) -> list[str]:
        """Trainable parameters no loss can reach: the vision encoder layers after the deepest
        ``vision_feature_layer`` (LLaVA reads the penultimate layer by default), the tower's
        post-layernorm and SigLIP's pooling head (they only feed the pooled output). DDP must be told
        (``find_unused``)."""
        cfg = self.hf.config
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
        num_layers = int(cfg.vision_config.num_hidden_layers)
        deepest = max(k if k >= 0 else num_layers + 1 + k for k in layers)  # hidden_states[k] = after layer k-1
        dead = tuple(f".encoder.layers.{i}." for i in range(deepest, num_layers)) + (".post_layernorm.", ".head.")
        return [name for name, p in self.named_parameters()
                if p.requires_grad and "vision_tower" in name and any(d in name for d in dead)]

    def vision_patches_per_frame(self) -> int:
        """(side / patch)^2 patches per frame (a CLIP class token is not counted)."""
        vcfg = self.hf.config.vision_config
        return (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2
