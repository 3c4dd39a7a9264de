"""The three parts every model is split into (vision encoder, projector, language model), and a fourth,
``spatial``, for a model with a spatial branch (``models/spatial.py``).

A model names the part of each of its parameters (``VLM.part_of``); freezing, per-part learning rates,
LoRA placement, activation checkpointing, FSDP2 sharding, the feature cache and the FLOPs model all
group parameters through the helpers here, never through a family's module names.
"""

from __future__ import annotations

from torch import nn

from vlmtrain.config import MODEL_PARTS

PARTS: tuple[str, ...] = MODEL_PARTS  # ("vision", "projector", "llm"): the config keys use the same names
SPATIAL_PART = "spatial"  # a spatial branch (models/spatial.py): frozen encoder + trainable projector
ALL_PARTS: tuple[str, ...] = PARTS + (SPATIAL_PART,)


def is_lora_param(name: str) -> bool:
    """True for PEFT LoRA weights (``lora_A``, ``lora_B``, ``lora_embedding_*``, ``lora_magnitude_*``)."""
    return any(component.startswith("lora_") for component in name.split("."))


def model_parts(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named parameters per part (LoRA weights in the part of the layer they adapt)."""
    parts: dict[str, list[tuple[str, nn.Parameter]]] = {p: [] for p in PARTS}
    for name, param in model.named_parameters():
        parts.setdefault(model.part_of(name), []).append((name, param))
    return parts


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per part."""
    return {part: sum(p.numel() for _, p in params if p.requires_grad) for part, params in model_parts(model).items()}


def trained_parts(model: nn.Module) -> tuple[set[str], set[str]]:
    """(parts with trainable full weights, parts with trainable LoRA layers)."""
    full, lora = set(), set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lora if is_lora_param(name) else full).add(model.part_of(name))
    return full, lora


def part_from_name(param_name: str, parts: dict[str, str], family: str) -> str:
    """The part of ``param_name`` whose module name (one dotted component) appears in it; matching
    whole components keeps it working under wrappers (``hf.``, peft's ``base_model.model.``, DDP's
    ``module.``)."""
    for component in param_name.split("."):
        if component in parts:
            return parts[component]
    raise ValueError(f"{family}: parameter {param_name!r} belongs to no known part "
                     f"(expected a component among {sorted(parts)})")
