"""What is applied to a model from outside it: per-part activation (gradient) checkpointing.

HF models mark their repeated blocks as ``GradientCheckpointingLayer``s and switch them on with
``PreTrainedModel.activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before
transformers 5.x). A VLM holds one such ``PreTrainedModel`` per tower (Qwen-VL ``model.visual`` and
``model.language_model``, LLaVA ``vision_tower`` / ``language_model``, the composed model's
``vision`` and ``lm``), so a part is checkpointed by calling HF's switch on the sub-models that own
that part's blocks, never on the whole VLM (which would checkpoint every part).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from vlmtrain.models.packed_attention import checkpoint_contexts



def _owner(model: nn.Module, layer_name: str) -> tuple[str, nn.Module]:
    """The nearest enclosing HF ``PreTrainedModel`` that supports checkpointing (name, module)."""
    from transformers import PreTrainedModel

    parts = layer_name.split(".")
    for end in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:end])
        module = model.get_submodule(name)
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            return name, module
    raise ValueError(f"no HF model that supports gradient checkpointing encloses {layer_name}")


def apply_activation_checkpointing(model: nn.Module, parts: Sequence[str]) -> list[str]:
    """Recompute the activations of ``parts``' transformer blocks in backward (non-reentrant
    ``torch.utils.checkpoint``, RNG state preserved, so results do not change). Returns the names of
    the sub-models switched on. Raises ValueError for a part without checkpointable blocks, or whose
    blocks share a sub-model with another part (it could not be checkpointed alone)."""
    if not parts:
        return []
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer):
            layers.setdefault(model.part_of(f"{name}.weight"), []).append(name)
    switched = []
    for part in parts:
        if part not in layers:
            raise ValueError(f"train.grad_checkpointing: part {part!r} of {type(model).__name__} has no layer that "
                             f"supports gradient checkpointing (parts that do: {sorted(layers)})")
        owners = dict(_owner(model, layer) for layer in layers[part])
        for owner_name, owner in owners.items():
            inside = [f"{owner_name}.{n}" if owner_name else n for n, m in owner.named_modules()
                      if isinstance(m, GradientCheckpointingLayer)]
            others = sorted({model.part_of(f"{n}.weight") for n in inside} - {part})
            if others:
                raise ValueError(f"train.grad_checkpointing: {owner_name or 'the model'} holds the {part} and "
                                 f"{others} layers; {part} cannot be checkpointed alone")
            # transformers 4.x defaulted to the reentrant variant; the recomputation must see the
            # forward's packed-document layout (models/packed_attention.py).
            kwargs = {"use_reentrant": False, "context_fn": checkpoint_contexts}
            if hasattr(owner, "activation_checkpointing_enable"):
                owner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                owner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            switched.append(owner_name)
    return switched
