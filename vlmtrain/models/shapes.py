"""The matmul shape of a transformer stack, read from an HF config: what the FLOPs model counts.

Each model reports its LM's and vision tower's shapes (``VLM.transformer_shapes``); the config
classes of every supported family (text LMs, SigLIP / CLIP / Idefics3 / Qwen-VL towers) are known
here, so ``metrics/flops.py`` only does arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

# Decoder-only text LMs whose MLP is gated (SwiGLU: gate, up and down projections).
_GATED_TEXT_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "smollm3",
})
# Vision towers of the supported families and whether their MLP is gated.
_VISION_GATED = {
    "siglip_vision_model": False, "clip_vision_model": False, "idefics3_vision": False, "smolvlm_vision": False,
    "qwen2_vl_vision": False, "qwen2_5_vl_vision": True, "qwen3_vl_vision": False,
}
# Qwen-VL towers are configured as depth / num_heads / temporal patches (and, in transformers 4.x, their
# vision configs carried the composite model_type).
_QWEN_VISION = {"qwen2_vl_vision": "qwen2_vl_vision", "qwen2_5_vl_vision": "qwen2_5_vl_vision",
                "qwen3_vl_vision": "qwen3_vl_vision", "qwen2_vl": "qwen2_vl_vision",
                "qwen2_5_vl": "qwen2_5_vl_vision", "qwen3_vl": "qwen3_vl_vision"}


@dataclass(frozen=True)
class TransformerShape:
    """The matmul shape of a transformer stack (text LM or vision encoder).

    ``vocab`` is 0 for a vision encoder (no LM head). ``patch_embed_params`` is the per-token matmul
    weight count of a vision encoder's patch embedding (a convolution with stride = kernel, i.e. a
    matmul per patch); 0 for text, whose input is an embedding lookup.
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    patch_embed_params: int = 0

    def layer_params(self) -> int:
        """Matmul weights of one block: q, k, v, o projections and the MLP."""
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        attn = self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return attn + mlp

    def body_params(self) -> int:
        """Matmul weights every token passes through (patch embedding + all blocks), LM head excluded."""
        return self.patch_embed_params + self.layers * self.layer_params()

    def head_params(self) -> int:
        """Weights of the LM head (``hidden x vocab``; counted even when tied to the embedding)."""
        return self.hidden * self.vocab

    def matmul_params(self) -> int:
        """N: all matmul weights (blocks, patch embedding and LM head)."""
        return self.body_params() + self.head_params()

    def attention_flops(self, seq_lengths: Sequence[int], causal: bool) -> int:
        """Forward FLOPs of ``QK^T`` and ``AV`` over all layers for independent sequences.

        Each sequence of length L costs ``4 * head_dim * heads * L^2`` per layer (halved when causal).
        """
        squares = sum(int(n) * int(n) for n in seq_lengths)
        per_layer = 4 * self.head_dim * self.heads * squares
        return self.layers * (per_layer // 2 if causal else per_layer)


def _require(cfg: Any, names: Sequence[str], kind: str) -> dict[str, Any]:
    """Attributes ``names`` of ``cfg``; one error listing every missing name."""
    missing = [n for n in names if getattr(cfg, n, None) is None]
    if missing:
        mt = getattr(cfg, "model_type", type(cfg).__name__)
        raise ValueError(f"{kind} config (model_type={mt!r}) lacks attribute(s) {missing}: build a "
                         f"TransformerShape by hand for this architecture")
    return {n: getattr(cfg, n) for n in names}


def shape_from_hf_config(cfg: Any) -> TransformerShape:
    """A :class:`TransformerShape` from an HF config, read attribute by attribute.

    Text configs: Llama, Mistral, Qwen2, Qwen3 and the Qwen-VL ``text_config`` s (gated MLP).
    Vision configs: SigLIP, CLIP, Idefics3 vision and the Qwen2/2.5/3-VL ``vision_config`` s; their
    patch merger is the *projector* and is not part of the shape. A composite VLM config (with
    ``text_config`` / ``vision_config``) is rejected with a hint: pass the sub-config you mean.
    """
    mt = getattr(cfg, "model_type", "")
    if getattr(cfg, "text_config", None) is not None or getattr(cfg, "vision_config", None) is not None:
        raise ValueError(f"{mt!r} is a composite config: pass cfg.text_config or cfg.vision_config")
    if mt in _GATED_TEXT_TYPES:
        a = _require(cfg, ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size"], "text")
        heads = a["num_attention_heads"]
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        # Qwen3 sets head_dim explicitly (it may differ from hidden / heads); Llama may leave it None.
        head_dim = getattr(cfg, "head_dim", None) or a["hidden_size"] // heads
        return TransformerShape(a["hidden_size"], a["num_hidden_layers"], heads, kv_heads, head_dim,
                                a["intermediate_size"], a["vocab_size"], gated_mlp=True)
    if mt in _QWEN_VISION:
        mt = _QWEN_VISION[mt]
        a = _require(cfg, ["depth", "num_heads", "patch_size", "temporal_patch_size", "in_channels"], "vision")
        if mt == "qwen2_vl_vision":
            # Qwen2-VL: the tower width is embed_dim (hidden_size is the LM width the merger targets).
            width = _require(cfg, ["embed_dim", "mlp_ratio"], "vision")
            hidden, inter = width["embed_dim"], int(width["embed_dim"] * width["mlp_ratio"])
        else:
            width = _require(cfg, ["hidden_size", "intermediate_size"], "vision")
            hidden, inter = width["hidden_size"], width["intermediate_size"]
        patch = a["in_channels"] * a["temporal_patch_size"] * a["patch_size"] ** 2 * hidden
        return TransformerShape(hidden, a["depth"], a["num_heads"], a["num_heads"], hidden // a["num_heads"],
                                inter, 0, gated_mlp=_VISION_GATED[mt], patch_embed_params=patch)
    if mt in _VISION_GATED:
        a = _require(cfg, ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "patch_size"], "vision")
        hidden, heads = a["hidden_size"], a["num_attention_heads"]
        channels = getattr(cfg, "num_channels", None) or 3
        return TransformerShape(hidden, a["num_hidden_layers"], heads, heads, hidden // heads,
                                a["intermediate_size"], 0, gated_mlp=_VISION_GATED[mt],
                                patch_embed_params=channels * a["patch_size"] ** 2 * hidden)
    if mt in ("dinov2", "dinov2_with_registers"):  # spatial encoders (models/spatial.py): MLP width by ratio
        a = _require(cfg, ["hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "patch_size"],
                     "vision")
        hidden, heads = a["hidden_size"], a["num_attention_heads"]
        gated = bool(getattr(cfg, "use_swiglu_ffn", False))
        # SwiGLU FFN in DINOv2: hidden features = int(2/3 x ratio x hidden) rounded up to a multiple of 8.
        inter = (int(int(hidden * a["mlp_ratio"]) * 2 / 3) + 7) // 8 * 8 if gated else int(hidden * a["mlp_ratio"])
        channels = getattr(cfg, "num_channels", None) or 3
        return TransformerShape(hidden, a["num_hidden_layers"], heads, heads, hidden // heads, inter, 0,
                                gated_mlp=gated, patch_embed_params=channels * a["patch_size"] ** 2 * hidden)
    known = sorted(_GATED_TEXT_TYPES | set(_VISION_GATED) | {"dinov2", "dinov2_with_registers"})
    raise ValueError(f"no FLOPs shape rule for model_type={mt!r}; known: {known}")
