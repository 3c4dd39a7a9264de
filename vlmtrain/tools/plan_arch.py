"""What ``vlmtrain plan``'s activation model needs to know about a model, read off the built model (a
meta-device one is enough): per part, the transformer block's shape and, per projection, whether it
trains, is frozen or carries LoRA; the vision tower's patch embedding; the projector's layers.

Read through module names and classes (``q_proj`` / ``qkv`` / ``gate_proj`` / ``fc1`` ..., RMSNorm /
LayerNorm), never through a family name, so the composed model and every HF adapter are described by
one function. ``tools/plan_activations.py`` turns a :class:`ModelSpec` and a micro-batch's shape into
saved-tensor bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from vlmtrain.parallel.parallelize import transformer_blocks

# Last name component of a projection -> its role in a block.
ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "qkv": "qkv", "o_proj": "o", "out_proj": "o", "proj": "o",
         "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "fc1": "fc1", "fc2": "fc2",
         "linear_fc1": "fc1", "linear_fc2": "fc2"}
TRAINED, FROZEN, LORA = "trained", "frozen", "lora"


@dataclass(frozen=True)
class BlockSpec:
    """One part's repeated transformer block (all blocks of a part alike) and how it trains."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool  # SwiGLU MLP (gate, up, down) rather than fc1 -> act -> fc2
    norm: str  # "rms" | "layer"
    norm_trained: bool
    fused_qkv: bool  # one qkv projection (Qwen-VL towers): v stays a view of its output
    rotary: bool  # rotary position embedding applied to q and k
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    modes: dict[str, str]  # role -> trained | frozen | lora
    checkpointed: bool = False  # activation checkpointing on for this part


@dataclass(frozen=True)
class MicroShape:
    """The shape of one micro-batch as the LM and the vision tower see it."""

    row_docs: tuple[tuple[int, ...], ...]  # per row, the lengths of its documents (samples)
    width: int  # padded row width: the LM computes rows x width positions
    varlen: bool  # per-document attention on packed rows (else SDPA with a mask over padded rows)
    frames: int  # unique frames the vision tower runs on (0 with a warm feature cache)
    projector_frames: int  # frames the projector runs on (= frames, or every unique frame with a split cache)
    visual_tokens: int  # image-token positions filled with visual tokens
    labels: int  # labelled positions (the LM head runs there only)

    @property
    def tokens(self) -> int:
        """Positions the LM computes (padding included)."""
        return len(self.row_docs) * self.width


@dataclass(frozen=True)
class LinearSpec:
    """One projector linear layer: widths and mode."""

    in_features: int
    out_features: int
    mode: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything the activation model reads from a model."""

    lm: BlockSpec
    vocab: int
    embed_trained: bool
    head_trained: bool
    final_norm_trained: bool
    vision: Optional[BlockSpec]
    patches_per_frame: int
    patch_dim: int  # inputs per patch of the patch embedding (channels x temporal x patch^2)
    patch_embed_trained: bool
    vision_post_norm: Optional[bool]  # None: no post norm; else whether it trains (SigLIP post_layernorm)
    merge_norm: Optional[bool]  # projector norm over vision features first (Qwen merger ln_q): trains?
    projector: tuple[LinearSpec, ...]
    tokens_per_frame: int  # rows the projector's first layer sees per frame
    frame_age_trained: bool  # composed: learned frame-age embedding added to the visual tokens
    lora_rank: int = 0
    lora_dropout: float = 0.0


def _is_lora(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, LoraLayer)


def _mode(module: nn.Module) -> str:
    if _is_lora(module):
        return LORA
    weight = getattr(module, "weight", None)
    return TRAINED if weight is not None and weight.requires_grad else FROZEN


def _trains(module: Optional[nn.Module]) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _projections(block: nn.Module) -> dict[str, nn.Module]:
    """role -> projection module of one block (LoRA wrappers, not their inner base/adapter layers)."""
    out: dict[str, nn.Module] = {}
    for name, module in block.named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") or p == "base_layer" for p in parts):
            continue
        role = ROLES.get(parts[-1])
        if role and role not in out and (isinstance(module, nn.Linear) or _is_lora(module)):
            out[role] = module
    return out


def _norms(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in block.named_modules()
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]


def block_spec(blocks: list[nn.Module], shape, checkpointed: bool) -> BlockSpec:
    """The :class:`BlockSpec` of a part's ``blocks`` (described by the first) with ``shape`` (its
    ``TransformerShape``)."""
    first = blocks[0]
    proj = _projections(first)
    norms = _norms(first)
    block_norms = [m for n, m in norms if n.split(".")[-1] not in ("q_norm", "k_norm")]
    kind = "layer" if block_norms and isinstance(block_norms[0], nn.LayerNorm) else "rms"
    # Text LMs of every family use rotary positions; of the towers only the Qwen-VL ones (fused qkv).
    rotary = shape.vocab > 0 or "qkv" in proj
    return BlockSpec(
        layers=len(blocks), hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, intermediate=shape.intermediate, gated="gate" in proj, norm=kind,
        norm_trained=any(_trains(m) for m in block_norms), fused_qkv="qkv" in proj, rotary=rotary,
        qk_norm=any(n.split(".")[-1] in ("q_norm", "k_norm") for n, _ in norms),
        modes={role: _mode(m) for role, m in proj.items()}, checkpointed=checkpointed)


def _named(model: nn.Module, suffixes: tuple[str, ...], part: str) -> Optional[nn.Module]:
    for name, module in model.named_modules():
        if name.split(".")[-1] in suffixes and model.part_of(f"{name}.weight") == part:
            return module
    return None


def model_spec(model: nn.Module, checkpointed: tuple[str, ...] = ()) -> ModelSpec:
    """A :class:`ModelSpec` of ``model`` as it is set to train (freezing and LoRA applied);
    ``checkpointed``: parts with activation checkpointing (``train.grad_checkpointing``)."""
    lm_shape, vision_shape = model.transformer_shapes()
    blocks = transformer_blocks(model)
    lm = block_spec(blocks["llm"], lm_shape, "llm" in checkpointed)
    vision = block_spec(blocks["vision"], vision_shape, "vision" in checkpointed) if "vision" in blocks else None
    patch = _named(model, ("patch_embedding", "patch_embed"), "vision")
    post = _named(model, ("post_layernorm",), "vision")
    merge_norm = _named(model, ("ln_q",), "projector")
    linears = [m for n, m in model.named_modules()
               if (isinstance(m, nn.Linear) or _is_lora(m)) and not any(
                   p.startswith("lora_") or p == "base_layer" for p in n.split("."))
               and model.part_of(f"{n}.weight") == "projector"]
    projector = tuple(LinearSpec(int(getattr(m, "in_features")), int(getattr(m, "out_features")), _mode(m))
                      for m in linears)
    frame_age = getattr(model, "frame_age", None)
    lora = next((m for m in model.modules() if _is_lora(m)), None)
    rank = int(next(iter(lora.r.values()))) if lora is not None else 0
    dropout = 0.0
    if lora is not None:
        drop = next(iter(lora.lora_dropout.values()))
        dropout = float(getattr(drop, "p", 0.0))
    return ModelSpec(
        lm=lm, vocab=lm_shape.vocab, embed_trained=_trains(_input_embeddings(model)),
        head_trained=_trains(model.output_embeddings()),
        final_norm_trained=_trains(_final_norm(model)),
        vision=vision, patches_per_frame=model.vision_patches_per_frame(),
        patch_dim=vision_shape.patch_embed_params // max(vision_shape.hidden, 1),
        patch_embed_trained=_trains(patch), vision_post_norm=None if post is None else _trains(post),
        merge_norm=None if merge_norm is None else _trains(merge_norm), projector=projector,
        tokens_per_frame=model.tokens_per_frame(0), frame_age_trained=_trains(frame_age),
        lora_rank=rank, lora_dropout=dropout)


def _input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    for owner in (getattr(model, "lm", None), getattr(model, "hf", None)):
        if owner is not None and hasattr(owner, "get_input_embeddings"):
            return owner.get_input_embeddings()
    return None


def _final_norm(model: nn.Module) -> Optional[nn.Module]:
    """The LM's last norm (``...model.norm`` / ``language_model.norm``)."""
    found = None
    for name, module in model.named_modules():
        if name.split(".")[-1] == "norm" and model.part_of(f"{name}.weight") == "llm":
            found = module
    return found
