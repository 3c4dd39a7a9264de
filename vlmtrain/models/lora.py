"""LoRA for every HF adapter (``HFVLMAdapter``) through PEFT.

How PEFT wraps the model: ``apply_lora`` calls ``peft.get_peft_model(adapter.hf, config)``, which
injects LoRA layers *in place* into ``adapter.hf`` (each targeted ``nn.Linear`` becomes a LoRA layer
holding the original module as ``base_layer``) and returns a ``PeftModel`` around it.
``adapter.hf`` stays the HF ``...ForConditionalGeneration`` object, now holding LoRA layers, and
the ``PeftModel`` is kept beside it (``peft_model_of``) for saving and merging.

Why not ``adapter.hf = peft_model``: the adapters reach submodules as ``self.hf.model.vision_tower``,
``self.hf.model.language_model``, ``self.hf.model.get_rope_index``. On a ``PeftModel``, ``.model``
resolves through ``PeftModel.__getattr__`` -> ``LoraModel.model``, which is the *whole* HF
``...ForConditionalGeneration``, not its inner ``.model``, so ``hf.model.vision_tower`` fails
(checked on LLaVA). Keeping ``adapter.hf`` the HF model keeps every adapter path, ``part_of`` and
``hf_loss`` unchanged, while the ``PeftModel`` still gives PEFT's own ``save_pretrained`` and
``merge_and_unload`` (``inject_adapter_in_model`` alone would give neither). The ``PeftModel`` is
stored outside ``nn.Module`` registration so its parameters (the same tensors) are not listed twice in
``named_parameters`` / ``state_dict``; moving the adapter (``.to``) moves them too, as they are shared.

Targets are resolved by module *suffix* (last name component) among ``nn.Linear`` modules, restricted
to the requested parts with ``adapter.part_of``, into an explicit list of full module names: the LLM's
``q_proj`` and the vision tower's ``q_proj`` are told apart by part, and convolutions that share a
suffix (Qwen's ``patch_embed.proj``) are never targeted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from vlmtrain.models.parts import PARTS, is_lora_param


# Suffixes of the linear layers LoRA targets by default, the union over the supported families:
# LLM attention + MLP (Llama / Qwen2 / Qwen3 naming), SigLIP / Idefics3 vision attention
# (q/k/v_proj, out_proj) and MLP (fc1, fc2), Qwen-VL vision attention (qkv, proj) and MLP (fc1/fc2 in
# Qwen2-VL, gate/up/down_proj in Qwen2.5-VL, linear_fc1/2 in Qwen3-VL). Names a family lacks are skipped.
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "out_proj", "fc1", "fc2", "qkv", "proj", "linear_fc1", "linear_fc2",
)

# Where the PeftModel is kept on the adapter (plain instance attribute, not a registered submodule).
_PEFT_ATTR = "_vlmtrain_peft_model"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters and placement (fed from the run config's ``model.lora_*`` fields)."""

    rank: int = 16
    """LoRA rank r of every adapted linear layer."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input (training only; identity in eval mode)."""
    target_modules: Optional[tuple[str, ...]] = None
    """Module-name suffixes to adapt (e.g. ``("q_proj", "v_proj")``); every name must match a linear
    layer in ``parts``. None: ``DEFAULT_TARGETS``, where names the model lacks are skipped."""
    parts: tuple[str, ...] = ("llm", "vision")
    """Model parts that get LoRA layers: any of "vision", "projector", "llm"."""

    def __post_init__(self) -> None:
        if self.rank <= 0 or self.alpha <= 0:
            raise ValueError(f"LoRA rank and alpha must be positive, got rank={self.rank} alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        self.parts = tuple(self.parts)
        unknown = sorted(set(self.parts) - set(PARTS))
        if not self.parts or unknown:
            raise ValueError(f"LoRA parts must be a non-empty subset of {PARTS}, got {self.parts}")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("LoRA target_modules is empty; use None for the defaults")


def safe_part(adapter: nn.Module, name: str) -> str:
    """``adapter.part_of(name)``, or "other" for parameters outside every part (e.g. extra heads)."""
    try:
        return adapter.part_of(name)
    except ValueError:
        return "other"


def linear_modules_by_part(adapter: nn.Module) -> dict[str, dict[str, str]]:
    """Every ``nn.Linear`` in ``adapter.hf``: part -> {full module name (relative to hf): suffix}.

    On a model that already has LoRA layers, a wrapped linear is listed under its own name (not as
    ``...base_layer``) and the LoRA weights themselves are not listed.
    """
    found: dict[str, dict[str, str]] = {}
    for name, module in adapter.hf.named_modules():
        if any(c == "base_layer" or c.startswith("lora_") for c in name.split(".")):
            continue
        base = module.get_base_layer() if hasattr(module, "base_layer") else module
        if isinstance(base, nn.Linear):
            part = safe_part(adapter, f"hf.{name}.weight")
            found.setdefault(part, {})[name] = name.rsplit(".", 1)[-1]
    return found


def resolve_targets(adapter: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names (relative to ``adapter.hf``) of the linear layers LoRA adapts.

    Raises ValueError when an explicitly requested suffix matches no linear layer in the requested
    parts (listing the suffixes that do exist there), or when nothing at all is matched.
    """
    by_part = linear_modules_by_part(adapter)
    candidates = {name: suffix for part in settings.parts for name, suffix in by_part.get(part, {}).items()}
    available = sorted(set(candidates.values()))
    wanted = settings.target_modules or DEFAULT_TARGETS
    if settings.target_modules is not None:
        missing = [t for t in wanted if t not in available]
        if missing:
            elsewhere = sorted({s for p, mods in by_part.items() if p not in settings.parts
                                for s in mods.values()} & set(missing))
            hint = f" ({elsewhere} exist only in other parts)" if elsewhere else ""
            raise ValueError(f"LoRA target modules {missing} match no linear layer in parts "
                             f"{list(settings.parts)}{hint}; available linear module suffixes there: {available}")
    targets = sorted(name for name, suffix in candidates.items() if suffix in wanted)
    if not targets:
        raise ValueError(f"LoRA targets {list(wanted)} match no linear layer in parts {list(settings.parts)}; "
                         f"available linear module suffixes there: {available}")
    return targets


def peft_model_of(adapter: nn.Module):
    """The ``PeftModel`` that ``apply_lora`` (or ``load_adapter_export``) attached, or None."""
    return adapter.__dict__.get(_PEFT_ATTR)


def attach_peft_model(adapter: nn.Module, peft_model) -> None:
    """Keep ``peft_model`` (which wraps ``adapter.hf`` in place) on the adapter without registering
    it as a submodule, so its shared parameters are not listed twice (see the module docstring)."""
    if peft_model.get_base_model() is not adapter.hf:
        raise ValueError("the PeftModel does not wrap this adapter's hf model")
    object.__setattr__(adapter, _PEFT_ATTR, peft_model)


class LoraDropout(nn.Module):
    """Dropout on a LoRA branch's input, as ``nn.Dropout`` (each element kept with probability 1 - p
    and scaled by 1 / (1 - p), a fresh mask per call) with the mask drawn as ``rand >= p``: CPU
    ``bernoulli_`` (what ``nn.Dropout`` runs) took 19 % of a tiny Qwen2.5-VL LoRA step, ``rand`` is 2x
    cheaper for the same distribution."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = torch.rand_like(x)
        mask.ge_(self.p).mul_(1.0 / (1.0 - self.p))  # in place: 1 / (1 - p) where kept, else 0
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Replace PEFT's ``nn.Dropout`` on every LoRA branch by :class:`LoraDropout`; returns how many."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, drop in module.lora_dropout.items():
                if isinstance(drop, nn.Dropout):
                    module.lora_dropout[name] = LoraDropout(drop.p)
                    changed += 1
    return changed


def apply_lora(adapter: nn.Module, settings: LoraSettings) -> dict[str, Any]:
    """Inject LoRA layers into ``adapter.hf`` with PEFT; returns trainable-parameter counts.

    Call it after the freeze flags are applied. Afterwards LoRA weights are trainable, the base
    weights (and biases) of every adapted linear layer are frozen, and every other parameter keeps the
    ``requires_grad`` it had: a part the user trains fully (e.g. the projector) stays trainable, like
    PEFT's ``modules_to_save`` but without copying modules (``export`` saves those separately).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if peft_model_of(adapter) is not None or any(isinstance(m, LoraLayer) for m in adapter.hf.modules()):
        raise RuntimeError("apply_lora: the model already has LoRA layers")
    targets = resolve_targets(adapter, settings)  # raises before the model is touched
    # get_peft_model freezes everything but the LoRA weights; remember the freeze flags to restore.
    requires_grad = {id(param): param.requires_grad for param in adapter.hf.parameters()}
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=targets, bias="none",
        # No task_type: PeftModelForCausalLM's forward rewrites inputs for text-only models; the
        # plain PeftModel is only used to save and merge, never to run the forward.
        task_type=None,
    )
    peft_model = get_peft_model(adapter.hf, config)
    wrapped = set(peft_model.targeted_module_names)
    # PEFT compresses a long name list into an equivalent set of suffixes (also in adapter_config.json);
    # make sure it still adapted exactly the resolved modules.
    if wrapped != set(targets):
        raise RuntimeError(f"PEFT adapted {sorted(wrapped ^ set(targets))[:5]}... differently from the request")
    frozen_base = {id(param) for module in adapter.hf.modules() if isinstance(module, LoraLayer)
                   for param in module.get_base_layer().parameters()}
    for name, param in adapter.hf.named_parameters():
        if is_lora_param(name):
            param.requires_grad_(True)
        elif id(param) in frozen_base:
            param.requires_grad_(False)
        else:
            param.requires_grad_(requires_grad[id(param)])
    use_fast_dropout(adapter.hf)
    attach_peft_model(adapter, peft_model)
    counts = count_trainable(adapter)
    counts.update(rank=settings.rank, lora_modules=len(targets))
    return counts


def count_trainable(adapter: nn.Module) -> dict[str, Any]:
    """Parameter counts of the whole adapter: ``lora`` (trainable LoRA), ``other_trainable``
    (trainable non-LoRA), ``total`` (every parameter, LoRA included) and the same three per part
    under ``parts`` (vision / projector / llm, plus "other" for parameters outside them)."""
    parts: dict[str, dict[str, int]] = {}
    for name, param in adapter.named_parameters():
        row = parts.setdefault(safe_part(adapter, name), {"lora": 0, "other_trainable": 0, "total": 0})
        row["total"] += param.numel()
        if param.requires_grad:
            row["lora" if is_lora_param(name) else "other_trainable"] += param.numel()
    totals = {key: sum(row[key] for row in parts.values()) for key in ("lora", "other_trainable", "total")}
    return {**totals, "parts": {p: parts[p] for p in (*PARTS, "other") if p in parts}}


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_trainable(counts: dict[str, Any]) -> str:
    """One line for the start of a run, e.g. ``trainable 1.20M (LoRA r=16 on 196 modules 1.10M +
    other 0.10M) of 2.10B (0.06%) | vision lora 0.30M other 0 of 0.40B | ...``."""
    trainable = counts["lora"] + counts["other_trainable"]
    lora = f"LoRA r={counts['rank']} on {counts['lora_modules']} modules " if "rank" in counts else "LoRA "
    head = (f"trainable {_human(trainable)} ({lora}{_human(counts['lora'])} + other "
            f"{_human(counts['other_trainable'])}) of {_human(counts['total'])} "
            f"({100.0 * trainable / max(counts['total'], 1):.2f}%)")
    parts = [f"{p} lora {_human(r['lora'])} other {_human(r['other_trainable'])} of {_human(r['total'])}"
             for p, r in counts["parts"].items()]
    return " | ".join([head, *parts])
