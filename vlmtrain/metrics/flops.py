"""A FLOPs model of one training step, MFU against a known peak, and TGS.

What is counted (model FLOPs, the MFU convention of PaLM and Megatron-LM):

- **dense**: every weight matmul. A token through a part with ``N`` matmul weights costs ``2N`` FLOPs
  forward (one multiply and one add per weight). Embedding lookups, norms, biases, activations and
  softmax are left out: they are a few percent at most and are not tensor-core work.
- **attention**: the two matmuls that have no weights, ``Q K^T`` and ``softmax(..) V``. A query
  attending to ``s`` keys costs ``2 * 2 * s * head_dim * heads`` forward per layer. Lengths are the
  *real per-document lengths*: a pack of documents under a block-diagonal mask costs ``sum(L_i^2)``,
  not ``(sum L_i)^2``. The LM is causal, so its pair count is halved (``L^2 / 2``, the convention of
  FlashAttention's benchmarks); a vision encoder attends over all patches of one frame.

Training multipliers (per weight per token, dense part):

====================  ====  =========================================================================
mode                  mult  why
====================  ====  =========================================================================
``trained``           6N    forward 2N + activation grads 2N + weight grads 2N
``frozen_backprop``   4N    frozen, but a trained part upstream needs its input grads: no weight grads
``frozen``            2N    frozen and nothing upstream needs grads: forward only
``cached``            0     features read from the feature cache: the part never runs
====================  ====  =========================================================================

Attention has no weights, so its backward is the activation grads only: 3x forward when gradients
flow through it (``trained`` or ``frozen_backprop``), 1x for ``frozen`` and 0 for ``cached``.
Activation recomputation is *not* counted: that is what makes this MFU rather than HFU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from vlmtrain.models.shapes import TransformerShape

PartMode = Literal["trained", "frozen_backprop", "frozen", "cached"]

# FLOPs per matmul weight per token, by mode (see the module docstring).
DENSE_MULTIPLIER: Mapping[str, int] = {"trained": 6, "frozen_backprop": 4, "frozen": 2, "cached": 0}
# Multiple of the forward attention FLOPs, by mode: backward of a weightless matmul is 2x forward.
ATTENTION_MULTIPLIER: Mapping[str, int] = {"trained": 3, "frozen_backprop": 3, "frozen": 1, "cached": 0}

def count_linear_params(module: nn.Module) -> int:
    """Weights of every ``nn.Linear`` in ``module`` (e.g. the projector's ``projector_params``)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def part_modes(train_vision: bool, train_projector: bool, train_lm: bool, vision_cached: bool,
               lm_lora: bool = False) -> dict[str, PartMode]:
    """Modes of vision -> projector -> LM from freeze flags.

    Gradients flow backwards from the loss: a frozen part needs a backward pass only when some part
    *before* it (closer to the pixels) is trained. A LoRA-tuned LM (``lm_lora``) has frozen base
    weights that still need activation grads for its adapters: ``frozen_backprop`` (the adapters' own
    FLOPs are negligible and not counted).
    """
    if vision_cached and train_vision:
        raise ValueError("a cached vision encoder cannot be trained")
    vision: PartMode = "cached" if vision_cached else ("trained" if train_vision else "frozen")
    upstream = train_vision
    projector: PartMode = "trained" if train_projector else ("frozen_backprop" if upstream else "frozen")
    upstream = upstream or train_projector
    lm: PartMode = "trained" if train_lm else ("frozen_backprop" if upstream or lm_lora else "frozen")
    return {"vision": vision, "projector": projector, "lm": lm}


def _check_mode(name: str, mode: str) -> None:
    if mode not in DENSE_MULTIPLIER:
        raise ValueError(f"{name}={mode!r}; expected one of {sorted(DENSE_MULTIPLIER)}")


def step_flops(
    lm_shape: TransformerShape,
    vision_shape: Optional[TransformerShape],
    projector_params: int,
    lm_doc_lengths: Sequence[int],
    vision_patches_per_frame: int,
    frames_encoded: int,
    lm_mode: PartMode,
    vision_mode: PartMode,
    projector_mode: PartMode,
    lm_head_positions: int,
    projector_tokens_per_frame: Optional[int] = None,
) -> dict[str, int]:
    """Training FLOPs of one step (sum over its micro-batches), by part.

    ``lm_doc_lengths``: real length of every document the LM processes (in a pack, each document on
    its own, since a block-diagonal mask stops attention across documents). Padding is left out on
    purpose: it is not useful work, so MFU shows the waste. ``frames_encoded``: unique frames of the
    step (after de-duplication) — run through the tower, or read from the feature cache when
    ``vision_mode="cached"`` (the tower then costs 0, while a projector that is not cached still runs
    on those frames' features). ``lm_head_positions``: positions whose
    logits are computed (all tokens for an HF ``labels=`` forward). ``projector_tokens_per_frame``:
    tokens the projector's matmuls see per frame — after a pixel shuffle / patch merge that is
    ``patches / shuffle^2``; defaults to ``vision_patches_per_frame``.

    Returns ``{"vision_dense", "vision_attention", "projector", "lm_dense", "lm_attention", "lm_head",
    "vision", "lm", "total"}`` in FLOPs.
    """
    for name, mode in (("lm_mode", lm_mode), ("vision_mode", vision_mode), ("projector_mode", projector_mode)):
        _check_mode(name, mode)
    tokens = sum(int(n) for n in lm_doc_lengths)
    out: dict[str, int] = {}
    if vision_shape is None or frames_encoded == 0:
        out["vision_dense"] = out["vision_attention"] = 0
    else:
        patches = vision_patches_per_frame * frames_encoded
        out["vision_dense"] = DENSE_MULTIPLIER[vision_mode] * vision_shape.body_params() * patches
        # Each frame is its own attention sequence (full, not causal).
        attn = vision_shape.attention_flops([vision_patches_per_frame] * frames_encoded, causal=False)
        out["vision_attention"] = ATTENTION_MULTIPLIER[vision_mode] * attn
    proj_tokens = (vision_patches_per_frame if projector_tokens_per_frame is None
                   else projector_tokens_per_frame) * frames_encoded
    out["projector"] = DENSE_MULTIPLIER[projector_mode] * projector_params * proj_tokens
    out["lm_dense"] = DENSE_MULTIPLIER[lm_mode] * lm_shape.body_params() * tokens
    out["lm_attention"] = ATTENTION_MULTIPLIER[lm_mode] * lm_shape.attention_flops(lm_doc_lengths, causal=True)
    out["lm_head"] = DENSE_MULTIPLIER[lm_mode] * lm_shape.head_params() * lm_head_positions
    out["vision"] = out["vision_dense"] + out["vision_attention"]
    out["lm"] = out["lm_dense"] + out["lm_attention"] + out["lm_head"]
    out["total"] = out["vision"] + out["projector"] + out["lm"]
    return out


def mfu(flops_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved FLOP/s per device over that device's peak; None without a peak.

    Pass per-device numbers: ``step_flops(...)["total"]`` summed over ranks / world size / step time.
    """
    if peak is None or peak <= 0:
        return None
    return flops_per_s / peak


# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s per GPU. The match runs
# in order, so the more specific PCIe / NVL variants come before the SXM default ("GH200" matches h200). fp32 means true fp32
# (PyTorch leaves TF32 matmuls off by default), not TF32.
_PEAKS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("h100", "pcie"), {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    (("h100", "nvl"), {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    (("h100",), {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM5
    (("h200", "nvl"), {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    (("h200",), {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    (("a100",), {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
)
_DTYPE_KEYS = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}


def peak_flops(device_name: str, dtype: Union[torch.dtype, str]) -> Optional[float]:
    """Dense peak FLOP/s of one device (e.g. ``torch.cuda.get_device_name()``), None when unknown.

    Unknown devices (CPUs included) return None rather than a guess, so MFU is never made up.
    """
    key = _DTYPE_KEYS.get(dtype if isinstance(dtype, torch.dtype) else str(dtype).lower())
    if key is None:
        return None
    name = device_name.lower()
    for needles, table in _PEAKS:
        if all(n in name for n in needles):
            return table.get(key)
    return None


def tgs(samples_per_s: float, mean_seq_len: float, num_gpus: int) -> float:
    """Tokens per GPU per second: ``samples/s x mean sequence length / #GPUs``.

    This is the throughput measure InternVL reports for its (packed) training runs ("TGS"); it counts
    every sequence token (text and visual) and so is comparable across packing strategies only when
    ``mean_seq_len`` is the *real* (unpadded) length.
    """
    if num_gpus <= 0:
        raise ValueError(f"num_gpus={num_gpus} must be positive")
    return samples_per_s * mean_seq_len / num_gpus


@dataclass(frozen=True)
class SpatialFlops:
    """A spatial branch (``models/spatial.py``): its frozen encoder's shape and patches per frame, and
    its trainable projector's weights and tokens per frame."""

    encoder: TransformerShape
    patches_per_frame: int
    projector_params: int
    tokens_per_frame: int

    def step(self, unique_frames: int, spatial_encoded: int) -> int:
        """The encoder forward (frozen: 2N per patch, attention once) on the frames it ran on (0 when
        the spatial cache held them), the projector trained (6N per token) on every unique frame."""
        p = self.patches_per_frame
        encoder = (DENSE_MULTIPLIER["frozen"] * self.encoder.body_params() * p * spatial_encoded
                   + ATTENTION_MULTIPLIER["frozen"] * self.encoder.attention_flops([p] * spatial_encoded, causal=False))
        return encoder + DENSE_MULTIPLIER["trained"] * self.projector_params * self.tokens_per_frame * unique_frames


@dataclass(frozen=True)
class ModelFlops:
    """Per-step training FLOPs of one model as configured to train (shapes and part modes fixed).

    ``cached``: image features come from the feature cache (the tower runs only on misses, without
    gradients); ``split``: the cache holds vision-encoder features and the projector runs on every
    unique frame of the step.
    """

    lm: TransformerShape
    vision: Optional[TransformerShape]
    projector_params: int
    patches_per_frame: int
    tokens_per_frame: int
    modes: Mapping[str, str]
    cached: bool = False
    split: bool = False
    spatial: Optional[SpatialFlops] = None

    def step(self, doc_lengths: Sequence[int], unique_frames: int, frames_encoded: int, label_tokens: int,
             spatial_encoded: int = 0) -> int:
        """Training FLOPs of one step: documents' real lengths, unique frames, frames the tower ran on
        and labelled positions (the LM head runs only there, ``models/loss.py``), and the frames a
        spatial branch's encoder ran on."""
        vision_mode = "frozen" if self.cached else self.modes["vision"]
        parts = step_flops(self.lm, self.vision, 0, doc_lengths, self.patches_per_frame, frames_encoded,
                           self.modes["lm"], vision_mode, "frozen", label_tokens)
        proj_frames = unique_frames if (self.split or not self.cached) else frames_encoded
        proj_mode = self.modes["projector"] if (self.split or not self.cached) else "frozen"
        projector = DENSE_MULTIPLIER[proj_mode] * self.projector_params * self.tokens_per_frame * proj_frames
        spatial = self.spatial.step(unique_frames, spatial_encoded) if self.spatial is not None else 0
        return parts["total"] + projector + spatial


def model_flops(model: nn.Module, trained: set, lora: set, cached: bool = False, split: bool = False) -> ModelFlops:
    """:class:`ModelFlops` of any vlmtrain model, from its ``transformer_shapes()`` (LM and vision
    tower), its projector's linear layers (``part_of``) and its tokens per frame. ``trained`` /
    ``lora``: parts with trainable weights / trainable LoRA layers."""
    lm_shape, vision_shape = model.transformer_shapes()
    projector = sum(m.weight.numel() for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and model.part_of(f"{name}.weight") == "projector")
    modes = part_modes("vision" in trained or "vision" in lora, "projector" in trained or "projector" in lora,
                       "llm" in trained, vision_cached=False, lm_lora="llm" in lora)
    return ModelFlops(lm_shape, vision_shape, projector,
                      model.vision_patches_per_frame(), model.tokens_per_frame(0), modes, cached, split,
                      spatial_flops(model))


def spatial_flops(model: nn.Module) -> Optional[SpatialFlops]:
    """:class:`SpatialFlops` of a model's spatial branch (None without one)."""
    from vlmtrain.models.shapes import shape_from_hf_config
    from vlmtrain.models.spatial import spatial_branch

    branch = spatial_branch(model)
    if branch is None:
        return None
    h, w = branch.input_size
    return SpatialFlops(shape_from_hf_config(branch.encoder.config), (h // branch.patch) * (w // branch.patch),
                        count_linear_params(branch.projector), branch.grid[0] * branch.grid[1])
