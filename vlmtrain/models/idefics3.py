"""Idefics3 / SmolVLM adapter: ``Idefics3ForConditionalGeneration`` (SmolVLM uses the same class).

**No image splitting.** HF's processor normally tiles large images into a grid of sub-images plus a
global view; here every frame is resized to one square ``frame_size`` (the vision config's
``image_size`` by default) and becomes exactly one tile. That keeps K fixed per frame, so frame
de-duplication, the feature cache and packing stay family-agnostic. The placeholder sequence of one
frame is the one HF's ``Idefics3Processor`` writes for an unsplit image::

    <fake_token_around_image><global-img><image> x K<fake_token_around_image>

with K = (frame_side / patch_size)^2 / scale_factor^2 (the connector's pixel shuffle merges
scale_factor^2 patches into one LM token).

Chat format (simple, documented, close to SmolVLM's template), ``\\n`` a newline::

    {bos}[System: {system}<end_of_utterance>\\n]
    User:{user}<end_of_utterance>\\n
    Assistant: {answer}<end_of_utterance>\\n          (user/assistant pairs repeat)

(shown on three lines; the only newlines are the ``\\n``). ``{bos}`` only when the tokenizer has
one. Labels cover `` {answer}<end_of_utterance>`` only (not the ``Assistant:`` prefix, not the
trailing newline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import AutoImageProcessor, AutoTokenizer, Idefics3ForConditionalGeneration

from vlmtrain.models.hf_base import IMAGE_PLACEHOLDER, Encoded, FrameBatch, HFVLMAdapter, Turn
from vlmtrain.models.llava import TokenBuffer, resize_frames, special_token_id

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"


class Idefics3Adapter(HFVLMAdapter):
    """``Idefics3ForConditionalGeneration`` split into encode_images / embed / forward_lm."""

    family = "idefics3"
    supports_split = True
    TOWERS = {"vision": "vision_model", "projector": "connector", "lm": "text_model"}

    def __init__(self, hf: Idefics3ForConditionalGeneration, tokenizer, image_processor,
                 frame_size: tuple[int, int]):
        super().__init__(hf, tokenizer, image_processor, tuple(frame_size))
        height, width = frame_size
        patch, scale = hf.config.vision_config.patch_size, hf.config.scale_factor
        # The connector's pixel shuffle assumes a square patch grid divisible by scale_factor.
        if height != width or height % (patch * scale):
            raise ValueError(f"idefics3: frame_size {tuple(frame_size)} must be square with a side "
                             f"divisible by patch_size * scale_factor = {patch * scale}")
        self._k = (height // patch) ** 2 // scale ** 2
        if special_token_id(tokenizer, IMAGE_PLACEHOLDER) != hf.config.image_token_id:
            raise ValueError(f"idefics3: tokenizer's {IMAGE_PLACEHOLDER} id does not match "
                             f"config.image_token_id {hf.config.image_token_id}")
        self._fake_id = special_token_id(tokenizer, FAKE_IMAGE_TOKEN)
        self._global_id = special_token_id(tokenizer, GLOBAL_IMAGE_TOKEN)
        self._eou_id = special_token_id(tokenizer, END_OF_UTTERANCE)

    @classmethod
    def from_pretrained(cls, path: str | Path, frame_size: Optional[tuple[int, int]] = None,
                        dtype: torch.dtype = torch.float32) -> "Idefics3Adapter":
        """Load model, tokenizer and PIL image processor (``Idefics3ImageProcessorPil``) from a local
        directory (never downloads); ``frame_size`` defaults to the vision ``image_size`` square."""
        hf = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
        side = hf.config.vision_config.image_size
        return cls(hf, tokenizer, image_processor, frame_size or (side, side))

    # -- inputs ----------------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> FrameBatch:
        """PIL images -> FrameBatch of normalised pixels (N, 3, S, S), one unsplit tile per image."""
        side = self.frame_size[0]
        if len(images) == 0:
            return FrameBatch(torch.empty(0, 3, side, side))
        frames = resize_frames(images, self.frame_size, self.image_processor.resample)
        # Without splitting, the processor resizes every image to max_image_size square (a no-op
        # after resize_frames); do_resize=False skips its longest-edge upscaling step.
        out = self.image_processor(frames, do_resize=False, do_image_splitting=False,
                                   max_image_size={"longest_edge": side}, do_pad=False,
                                   return_tensors="pt")
        return FrameBatch(out["pixel_values"].reshape(len(images), 3, side, side))

    def tokens_per_frame(self, age: int = 0) -> int:
        """K = (frame_side / patch_size)^2 / scale_factor^2."""
        return self._k

    def _image_ids(self) -> list[int]:
        """The placeholder ids of one unsplit image (see the module docstring)."""
        return [self._fake_id, self._global_id] + [self.image_token_id] * self._k + [self._fake_id]

    def encode_conversation(self, turns: Sequence[Turn]) -> Encoded:
        """Tokens and labels in the module's chat format (see the module docstring)."""
        buf = TokenBuffer(self.tokenizer)
        if self.tokenizer.bos_token_id is not None:
            buf.add_ids([self.tokenizer.bos_token_id])
        newline = self.tokenizer.encode("\n", add_special_tokens=False)
        num_images = 0
        for turn in turns:
            if turn.role in ("system", "user"):
                prefix = "System: " if turn.role == "system" else "User:"
                num_images += buf.add_text(prefix + turn.text, image_ids=self._image_ids)
                buf.add_ids([self._eou_id] + newline)
            elif turn.role == "assistant":
                buf.add_text("Assistant:")
                buf.add_text(f" {turn.text}", train=True)
                buf.add_ids([self._eou_id], train=True)
                buf.add_ids(newline)
            else:
                raise ValueError(f"idefics3: unknown role {turn.role!r}")
        return buf.encoded(num_images)

    # -- the three calls -------------------------------------------------------------------------
    def encode_vision(self, frames: FrameBatch) -> torch.Tensor:
        """Frames -> (N, P, D_vision): the vision model (every patch valid: frames are never padded)."""
        pixels = frames.pixels.to(device=self.hf.device, dtype=self.hf.dtype)
        return self.hf.model.vision_model(pixel_values=pixels).last_hidden_state

    def hf_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                frames: FrameBatch) -> torch.Tensor:
        """HF ``forward(...).loss``.

        Idefics3 wants ``pixel_values`` as (B, max_images, 3, H, W): a sample with fewer images is
        padded with all-zero images, which HF drops before the vision model (a real normalised
        frame is never exactly all zero). ``pixel_attention_mask`` stays None: HF then treats every
        pixel of every real image as valid, which is right because frames are never padded.
        """
        k = self._k
        per_row = (input_ids == self.image_token_id).sum(dim=1).tolist()
        if any(n % k for n in per_row):
            raise ValueError(f"idefics3: image token counts {per_row} are not multiples of K={k}")
        counts = [n // k for n in per_row]
        if sum(counts) != frames.pixels.shape[0]:
            raise ValueError(f"idefics3: {sum(counts)} image slots but {frames.pixels.shape[0]} frames")
        pixel_values = None
        if sum(counts):
            pixel_values = frames.pixels.new_zeros(len(counts), max(counts), *frames.pixels.shape[1:])
            for row, sample_frames in enumerate(frames.pixels.split(counts)):
                pixel_values[row, : len(sample_frames)] = sample_frames
        out = self.hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                      labels=labels, use_cache=False)
        return out.loss

    # -- parts -----------------------------------------------------------------------------------
    def vision_patches_per_frame(self) -> int:
        """(frame side / patch)^2 patches per frame."""
        return (self.frame_size[0] // int(self.hf.config.vision_config.patch_size)) ** 2
