"""Adapters for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``HFVLMAdapter``, see ``models/hf_base.py``).

Each adapter wraps the family's ``...ForConditionalGeneration`` and splits it into
``encode_images`` (vision tower + merger), ``embed`` (image-pad tokens filled with visual tokens) and
``forward_lm`` (text model + lm_head + loss), reusing the HF submodules so the adapter loss equals
``hf(...).loss`` on the same inputs. Three things are Qwen-specific:

- every frame is resized to one ``frame_size`` (a multiple of ``patch_size * merge_size``) before
  the PIL image processor runs, so each frame has the same grid and K = (H/p)(W/p)/m^2 tokens;
- the LM uses MRoPE: ``position_ids`` are (3, B, L) and come from the HF model's own
  ``get_rope_index`` with ``mm_token_type_ids`` built from the image-pad tokens;
- Qwen3-VL adds DeepStack: intermediate vision features are added to the LM hidden states after its
  first layers, at the image positions (see ``Qwen3VLAdapter``).

Videos are not supported (frames are images; a history of frames is several images).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLForConditionalGeneration,
)

from vlmtrain.models.hf_base import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    Encoded,
    FrameBatch,
    HFVLMAdapter,
    Turn,
)
from vlmtrain.models.qwen_vl_inputs import (
    check_processor_matches,
    resolve_frame_size,
    special_token_id,
    to_rgb_pil,
)
from vlmtrain.models.loss import labelled_cross_entropy
from vlmtrain.models.protocol import take_rows
from vlmtrain.models.vision_attention import enable_batched_vision_attention, use_linear_patch_embed

ROLES = ("system", "user", "assistant")


class QwenVLAdapter(HFVLMAdapter):
    """What Qwen2-VL, Qwen2.5-VL and Qwen3-VL share; subclasses only name the HF class."""

    hf_class: ClassVar[type] = type(None)

    def __init__(self, hf: torch.nn.Module, tokenizer, image_processor: Qwen2VLImageProcessorPil,
                 frame_size: tuple[int, int]):
        super().__init__(hf, tokenizer, image_processor, frame_size)
        vcfg = hf.config.vision_config
        self.patch_size = int(vcfg.patch_size)
        self.merge_size = int(vcfg.spatial_merge_size)
        check_processor_matches(image_processor, vcfg)
        # Validated here too so that a direct construction cannot skip the check.
        self.frame_size = resolve_frame_size(frame_size, self.patch_size * self.merge_size)
        # Chat-format ids. The image wrappers and pad come from the model config (the LM was trained
        # with those ids); the tokenizer must agree or every image slot would be mis-located.
        self._im_start = special_token_id(tokenizer, "<|im_start|>")
        self._im_end = special_token_id(tokenizer, "<|im_end|>")
        for name, token in (("image_token_id", "<|image_pad|>"),
                            ("vision_start_token_id", "<|vision_start|>"),
                            ("vision_end_token_id", "<|vision_end|>")):
            if special_token_id(tokenizer, token) != getattr(hf.config, name):
                raise ValueError(f"{self.family}: tokenizer id of {token} differs from config.{name}="
                                 f"{getattr(hf.config, name)}; tokenizer and model do not belong together")
        # Token ids of a text piece, memoised (as the composed chat format does): a VLN data set repeats
        # the same pieces in every sample, and a tokenizer call costs ~40 us (start-up of 1574
        # samples: 0.93 s -> 0.1 s).
        self._piece_ids = lru_cache(maxsize=1 << 16)(self._tokenize_piece)
        enable_batched_vision_attention(hf.model.visual)  # one SDPA call per block, not one per frame
        use_linear_patch_embed(hf.model.visual)  # the stride = kernel Conv3d as a matmul
        self._newline = self._text_ids("\n")

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, frame_size: Optional[tuple[int, int]] = None,
                        dtype: torch.dtype = torch.float32) -> "QwenVLAdapter":
        """Load model, tokenizer and PIL image processor from the local directory ``path``.

        ``frame_size`` (height, width) must be a multiple of patch_size * merge_size (28 for
        Qwen2/2.5-VL, 32 for Qwen3-VL); None gives 16 x 16 merged tokens per frame.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{cls.family}: model directory {path} does not exist")
        model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
        if model_type != cls.family:
            raise ValueError(f"{path} holds a {model_type!r} model, not {cls.family!r} "
                             "(load_qwen_vl picks the adapter from config.json)")
        hf = cls.hf_class.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # Every Qwen-VL family uses Qwen2-VL's image processor; the PIL one avoids torchvision.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
        vcfg = hf.config.vision_config
        size = resolve_frame_size(frame_size, int(vcfg.patch_size) * int(vcfg.spatial_merge_size))
        return cls(hf, tokenizer, image_processor, size)

    # -- inputs ----------------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> FrameBatch:
        """PIL images (or HWC uint8 arrays) -> FrameBatch with pixels (N, patches_per_frame, patch_dim)
        and ``meta["image_grid_thw"]`` (N, 3). Frames are resized to ``frame_size`` here (bicubic) and
        the processor's own smart-resize is switched off, so every frame has the same grid."""
        h, w = self.frame_size
        frames = [to_rgb_pil(img).resize((w, h), Image.Resampling.BICUBIC) for img in images]
        if not frames:
            patch_dim = 3 * self.image_processor.temporal_patch_size * self.patch_size ** 2
            grid = (h // self.patch_size) * (w // self.patch_size)
            return FrameBatch(torch.zeros(0, grid, patch_dim),
                              {"image_grid_thw": torch.zeros(0, 3, dtype=torch.long)})
        out = self.image_processor(images=frames, do_resize=False, return_tensors="pt")
        pixels_NPD = out["pixel_values"].reshape(len(frames), -1, out["pixel_values"].shape[-1])
        return FrameBatch(pixels_NPD, {"image_grid_thw": out["image_grid_thw"].long()})

    def tokens_per_frame(self, age: int = 0) -> int:
        """K = (H / patch)(W / patch) / merge^2 visual tokens per frame."""
        h, w = self.frame_size
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2

    def visual_grid(self) -> tuple[int, int]:
        """(rows, cols) of a frame's merged visual tokens, which the merger emits row-major."""
        h, w = self.frame_size
        return h // self.patch_size // self.merge_size, w // self.patch_size // self.merge_size

    def _frame_grid(self) -> torch.Tensor:
        """(1, 3) grid_thw of one frame at ``frame_size``."""
        h, w = self.frame_size
        return torch.tensor([[1, h // self.patch_size, w // self.patch_size]], dtype=torch.long)

    def _tokenize_piece(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    def _text_ids(self, text: str) -> list[int]:
        return list(self._piece_ids(text))

    def _image_ids(self) -> list[int]:
        block = self.__dict__.get("_image_block")  # per frame size: HF config reads cost more than an encode
        if block is None or block[0] != self.frame_size:
            c = self.hf.config
            ids = [c.vision_start_token_id] + [c.image_token_id] * self.tokens_per_frame() + [c.vision_end_token_id]
            block = self.__dict__["_image_block"] = (self.frame_size, ids)
        return block[1]

    def encode_conversation(self, turns: Sequence[Turn]) -> Encoded:
        """Qwen chat format ``<|im_start|>{role}\\n{text}<|im_end|>\\n`` per turn, each ``<image>``
        expanded to ``<|vision_start|><|image_pad|>*K<|vision_end|>``. Labels cover assistant text and
        its ``<|im_end|>``; role headers, the trailing newline and image tokens are IGNORE_INDEX.

        No default system prompt is added (Qwen's chat template adds one only when a conversation has
        none; datasets that want it put a system turn in)."""
        ids: list[int] = []
        labels: list[int] = []
        num_images = 0
        for turn in turns:
            if turn.role not in ROLES:
                raise ValueError(f"{self.family}: unknown role {turn.role!r}; expected one of {ROLES}")
            learn = turn.role == "assistant"
            head = [self._im_start] + self._text_ids(f"{turn.role}\n")
            ids += head
            labels += [IGNORE_INDEX] * len(head)
            for i, piece in enumerate(turn.text.split(IMAGE_PLACEHOLDER)):
                if i > 0:  # an <image> stood before this piece
                    block = self._image_ids()
                    ids += block
                    labels += [IGNORE_INDEX] * len(block)
                    num_images += 1
                piece_ids = self._text_ids(piece)
                ids += piece_ids
                labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)
            ids += [self._im_end] + self._newline
            labels += ([self._im_end] if learn else [IGNORE_INDEX]) + [IGNORE_INDEX] * len(self._newline)
        return Encoded(input_ids=ids, labels=labels, num_images=num_images)

    # -- the three calls -------------------------------------------------------------------------
    def encode_images(self, frames: FrameBatch) -> torch.Tensor:
        """Frames -> visual tokens (N, K, D): HF vision tower + merger on the flattened patches."""
        n, p, d = frames.pixels.shape
        if n == 0:
            return frames.pixels.new_zeros(0, self.tokens_per_frame(), self._feature_dim())
        visual = self.hf.model.visual
        grid = frames.meta["image_grid_thw"].to(frames.pixels.device)
        out = visual(frames.pixels.reshape(n * p, d).to(visual.dtype), grid_thw=grid)
        tokens_TD = self._visual_tokens(out)
        return tokens_TD.reshape(n, -1, tokens_TD.shape[-1])

    def _visual_tokens(self, vision_out) -> torch.Tensor:
        """The per-token features ``embed`` consumes, from the vision tower's output."""
        return vision_out.pooler_output

    def _feature_dim(self) -> int:
        return int(self.hf.config.text_config.hidden_size)

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     frames: Optional[FrameBatch] = None, slot_frames: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
        """MRoPE positions (3, B, L) from the HF model's ``get_rope_index``, per sample; padding
        positions get 0. ``frames``/``slot_frames`` give each slot's grid (slots in row-major token
        order); without them every slot has the ``frame_size`` grid, which is the same thing.
        Runs a Python loop over samples (HF's function): cheap enough to call in the data loader."""
        image_mask = input_ids == self.image_token_id
        if frames is not None:
            grid = frames.meta["image_grid_thw"]
            grid = grid[slot_frames.to(grid.device)] if slot_frames is not None else grid
        else:
            n_slots = int(image_mask.sum()) // self.tokens_per_frame()
            grid = self._frame_grid().expand(n_slots, 3)
        merged = int((grid.prod(-1) // self.merge_size ** 2).sum()) if grid.numel() else 0
        if merged != int(image_mask.sum()):
            raise ValueError(f"{self.family}: {int(image_mask.sum())} image-pad tokens but the "
                             f"{grid.shape[0]} slot grids hold {merged} visual tokens")
        with torch.no_grad():
            # mm_token_type_ids: 0 text, 1 image; get_rope_index walks each sample's runs of image
            # tokens and takes the next grid for each run.
            pos_3BL, _ = self.hf.model.get_rope_index(
                input_ids, mm_token_type_ids=image_mask.int(),
                image_grid_thw=grid.to(input_ids.device) if grid.numel() else None,
                attention_mask=attention_mask,
            )
        return pos_3BL

    def packed_position_ids(self, input_ids: torch.Tensor, doc_lengths: Sequence[Sequence[int]]) -> torch.Tensor:
        """MRoPE positions (3, B, L) of packed rows: each document's positions computed on its own (as
        if unpacked) and laid end to end; padding gets 0. All documents go through one
        ``position_ids`` call as the rows of a padded batch."""
        docs = [(r, start, n) for r, lengths in enumerate(doc_lengths)
                for start, n in zip(torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist(), lengths)]
        width = max(n for _, _, n in docs)
        ids_DN = input_ids.new_full((len(docs), width), int(self.tokenizer.pad_token_id))
        mask_DN = torch.zeros_like(ids_DN)
        for d, (r, start, n) in enumerate(docs):
            ids_DN[d, :n] = input_ids[r, start:start + n]
            mask_DN[d, :n] = 1
        pos_3DN = self.position_ids(ids_DN, mask_DN)
        out = torch.zeros(3, *input_ids.shape, dtype=pos_3DN.dtype, device=pos_3DN.device)
        for d, (r, start, n) in enumerate(docs):
            out[:, r, start:start + n] = pos_3DN[:, d, :n]
        return out

    def forward_lm(self, inputs_embeds: torch.Tensor, labels: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None,
                   position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled positions (labels unshifted, -100 ignored),
        through the HF text model and lm_head. Pass ``position_ids`` from ``position_ids()`` whenever
        the batch holds images (None means plain 1D positions, right only for text-only rows).

        Logits are computed only at labelled positions, in checkpointed chunks when there are many
        (``models/loss.py``: same loss, far less memory with a 150k vocabulary). A batch without any
        label gives 0 (connected to the graph) where HF gives NaN."""
        hidden_BLD = self._run_lm(inputs_embeds, attention_mask, position_ids)
        return labelled_cross_entropy(hidden_BLD, self.hf.lm_head, labels)

    def _run_lm(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor],
                position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Final (normed) hidden states (B, L, D) of the HF text model."""
        return self.hf.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state

    def hf_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                frames: FrameBatch) -> torch.Tensor:
        """``hf(...).loss`` with the HF model doing vision, merge, MRoPE and loss itself
        (``frames`` hold one row per image slot, in token order)."""
        images = {}
        n, p, d = frames.pixels.shape
        if n:
            images = {"pixel_values": frames.pixels.reshape(n * p, d),
                      "image_grid_thw": frames.meta["image_grid_thw"]}
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                      mm_token_type_ids=(input_ids == self.image_token_id).int(), **images)
        return out.loss

    # -- parts -----------------------------------------------------------------------------------
    def part_of(self, param_name: str) -> str:
        """vision: ``visual.*`` (patch embed, position embedding, blocks); projector: ``visual.merger``
        and Qwen3-VL's ``visual.deepstack_merger_list``; llm: ``language_model.*`` and ``lm_head``.
        Matches path components, so PEFT / FSDP / compile prefixes do not matter."""
        parts = param_name.split(".")
        if "visual" in parts:
            after = parts[parts.index("visual") + 1:]
            return "projector" if after and after[0] in ("merger", "deepstack_merger_list") else "vision"
        if "language_model" in parts or "lm_head" in parts:
            return "llm"
        raise ValueError(f"{self.family}: cannot tell which part parameter {param_name!r} belongs to")

    def feature_producers(self, split: bool) -> list[nn.Module]:
        """The whole vision tower (its mergers included): Qwen-VL is not split, so a cache needs the
        merger (projector) frozen too."""
        if split:
            raise ValueError(f"{self.family}: the vision tower and its merger are not split; freeze both to cache")
        return [self.hf.model.visual]

    def vision_patches_per_frame(self) -> int:
        """(H / patch)(W / patch) patches per frame."""
        h, w = self.frame_size
        return (h // self.patch_size) * (w // self.patch_size)


class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL: ViT with 2D RoPE, 2x2 patch merger, MRoPE LM."""

    family: ClassVar[str] = "qwen2_vl"
    hf_class: ClassVar[type] = Qwen2VLForConditionalGeneration


class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, with windowed attention in most vision blocks (HF un-permutes the
    windows inside the tower, so its merged output is already in raster order)."""

    family: ClassVar[str] = "qwen2_5_vl"
    hf_class: ClassVar[type] = Qwen2_5_VLForConditionalGeneration


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: learned (interpolated) vision position embedding, interleaved MRoPE and DeepStack.

    DeepStack: the vision tower also returns ``n = len(deepstack_visual_indexes)`` intermediate
    feature maps (each through its own merger, width D = LM hidden size), and the HF text model adds
    the i-th one to its hidden states at the image positions after decoder layer i. To keep the three
    calls (and the feature cache) family-agnostic, the adapter carries them inside the ordinary
    tensors:

    - ``encode_images`` returns (N, K, (1 + n) * D): ``[main | deepstack_0 | ... | deepstack_{n-1}]``;
    - ``embed`` returns (B, L, (1 + n) * D): the first D channels are the usual input embeddings
      (text embeddings with the main features scattered in), the other n * D are the deepstack
      features at image positions and exact zeros elsewhere;
    - ``forward_lm`` splits them again and calls the HF text model with ``visual_pos_masks`` set to
      every position: adding 0.0 outside the images is exact, so this equals HF's masked add.

    The cost is (1 + n) x the feature-cache size and embedding activation of the other families.
    """

    family: ClassVar[str] = "qwen3_vl"
    hf_class: ClassVar[type] = Qwen3VLForConditionalGeneration

    @property
    def deepstack_levels(self) -> int:
        """n: the number of deepstack feature maps (3 for the released Qwen3-VL checkpoints)."""
        return len(self.hf.config.vision_config.deepstack_visual_indexes)

    def _visual_tokens(self, vision_out) -> torch.Tensor:
        return torch.cat([vision_out.pooler_output, *vision_out.deepstack_features], dim=-1)

    def _feature_dim(self) -> int:
        return (1 + self.deepstack_levels) * int(self.hf.config.text_config.hidden_size)

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor, slot_frames: torch.Tensor,
              slot_age: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, (1 + n) * D): input embeddings with the main features scattered into image slots,
        followed by the deepstack features at image positions (zeros elsewhere). ``slot_age`` is
        accepted for the shared signature and unused, as in the other HF adapters."""
        d = int(self.hf.config.text_config.hidden_size)
        if features.shape[-1] != self._feature_dim():
            raise ValueError(f"{self.family}: features have width {features.shape[-1]}, expected "
                             f"(1 + {self.deepstack_levels} deepstack) x {d} = {self._feature_dim()}")
        text_BLD = super().embed(input_ids, features[..., :d], slot_frames)  # checks the slot count
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        deep_TX = take_rows(features, slot_frames)[..., d:].reshape(-1, features.shape[-1] - d)
        deep_BLX = text_BLD.new_zeros(*input_ids.shape, deep_TX.shape[-1])
        deep_BLX = deep_BLX.masked_scatter(mask, deep_TX.to(text_BLD.dtype))
        return torch.cat([text_BLD, deep_BLX], dim=-1)

    def _run_lm(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor],
                position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        d = int(self.hf.config.text_config.hidden_size)
        if inputs_embeds.shape[-1] == d:  # plain embeddings (e.g. a text-only batch): no deepstack
            return super()._run_lm(inputs_embeds, attention_mask, position_ids)
        if inputs_embeds.shape[-1] != self._feature_dim():
            raise ValueError(f"{self.family}: inputs_embeds have width {inputs_embeds.shape[-1]}, expected "
                             f"{d} or {self._feature_dim()} (with deepstack features, see Qwen3VLAdapter)")
        b, length, _ = inputs_embeds.shape
        deep = [inputs_embeds[..., d * (1 + i): d * (2 + i)].reshape(b * length, d)
                for i in range(self.deepstack_levels)]
        everywhere = torch.ones(b, length, dtype=torch.bool, device=inputs_embeds.device)
        return self.hf.model.language_model(
            inputs_embeds=inputs_embeds[..., :d], attention_mask=attention_mask, position_ids=position_ids,
            visual_pos_masks=everywhere, deepstack_visual_embeds=deep, use_cache=False,
        ).last_hidden_state


ADAPTERS: dict[str, type[QwenVLAdapter]] = {
    cls.family: cls for cls in (Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter)
}


def load_qwen_vl(path: str | Path, frame_size: Optional[tuple[int, int]] = None,
                 dtype: torch.dtype = torch.float32) -> QwenVLAdapter:
    """The adapter matching ``config.json``'s model_type in the local directory ``path``."""
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"{path}: model_type {model_type!r} is not a Qwen-VL family {tuple(ADAPTERS)}")
    return ADAPTERS[model_type].from_pretrained(path, frame_size=frame_size, dtype=dtype)
