"""Export a trained HF adapter: a merged HF checkpoint, or a PEFT adapter plus trained modules.

Both exports refuse to leave a trained parameter behind. "Trained" means ``requires_grad`` in the
training adapter: LoRA weights, and every non-LoRA parameter the freeze flags left trainable (e.g. a
fully trained projector). A trained parameter that an export would not carry (one outside
``adapter.hf``, a key ``save_pretrained`` filters out, a tensor that reloads differently) raises
``ExportError`` naming it. Each export is written to a temporary sibling directory, verified, and only
then renamed to ``out_dir``, so a failed export leaves nothing that looks like a finished one.

- ``export_merged``: LoRA merged into the base weights of a *copy* (PEFT ``merge_and_unload``), saved
  with ``save_pretrained`` (safetensors) with the tokenizer and image processor; loads with
  ``AutoModelForImageTextToText.from_pretrained(out_dir)`` or the adapter's own ``from_pretrained``.
- ``export_adapter``: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` and
  ``trained_modules.safetensors`` (+ ``trained_modules.json``: names, parts and the adapter class);
  ``load_adapter_export(base_model_dir, export_dir)`` rebuilds the trained adapter from them.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import importlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vlmtrain.models.lora import attach_peft_model, is_lora_param, peft_model_of, safe_part

TRAINED_MODULES_FILE = "trained_modules.safetensors"
TRAINED_MODULES_INDEX = "trained_modules.json"
INDEX_FORMAT = "vlmtrain.trained_modules/1"


class ExportError(RuntimeError):
    """An export would lose (or did not faithfully write) a trained parameter."""


def checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes on CPU (dtype-exact; a reload must reproduce it bit for bit)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _trained(adapter: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """Trainable parameters split into LoRA and non-LoRA, keyed by name relative to ``adapter.hf``.

    Raises ExportError for trainable parameters outside ``adapter.hf``: no HF or PEFT file holds them.
    """
    lora, other, outside = {}, {}, []
    for name, param in adapter.named_parameters():
        if not param.requires_grad:
            continue
        if not name.startswith("hf."):
            outside.append(name)
        elif is_lora_param(name):
            lora[name[len("hf."):]] = param
        else:
            other[name[len("hf."):]] = param
    if outside:
        raise ExportError(f"trained parameters outside the HF model cannot be exported: {outside}")
    return lora, other


def _fresh_dir(out_dir: Path, overwrite: bool) -> Path:
    """A new temporary directory beside ``out_dir`` (same filesystem, so the final rename is atomic)."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out_dir: Path) -> Path:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _strip_base_layer(name: str) -> str:
    """A training-time name as it is in the unwrapped HF model (PEFT nests originals in base_layer)."""
    return ".".join(c for c in name.split(".") if c != "base_layer")


def export_merged(adapter: nn.Module, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Save the trained model as a plain HF checkpoint: LoRA merged, every trained tensor included.

    The training model is not modified: LoRA is merged into a deep copy (PEFT ``merge_and_unload``),
    which costs one extra copy of the model in memory. After writing, the checkpoint is reloaded
    with the model's own class and every trained tensor (merged LoRA weights and trained non-LoRA
    parameters) is compared by checksum; a missing or different one raises ExportError.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    lora, other = _trained(adapter)
    peft_model = peft_model_of(adapter)
    if lora and peft_model is None:
        raise ExportError(f"LoRA parameters {sorted(lora)[:3]} without an attached PeftModel")
    # Name in the merged model of every trained tensor -> the training names it comes from.
    expected: dict[str, list[str]] = {}
    for name in lora:  # ...q_proj.lora_A.default.weight -> ...q_proj.weight (merged into the base)
        module = name.split(".lora_")[0]
        expected.setdefault(f"{module}.weight", []).append(name)
    for name in other:
        expected.setdefault(_strip_base_layer(name), []).append(name)

    if peft_model is not None:
        # safe_merge checks the merged weights for NaN/inf before replacing the base weights.
        merged = copy.deepcopy(peft_model).merge_and_unload(safe_merge=True)
    else:  # no LoRA: nothing to merge and save_pretrained does not modify the model
        merged = adapter.hf
    state = merged.state_dict()
    ignored = set(getattr(merged, "_keys_to_ignore_on_save", None) or ())
    left_out = sorted(src for key, srcs in expected.items() if key not in state or key in ignored for src in srcs)
    if left_out:
        raise ExportError(f"trained parameters would be left out of the merged checkpoint: {left_out}")
    sums = {key: checksum(state[key]) for key in expected}
    model_cls, dtype = type(merged), next(merged.parameters()).dtype
    del state

    tmp = _fresh_dir(out_dir, overwrite)
    try:
        merged.save_pretrained(tmp)
        adapter.tokenizer.save_pretrained(tmp)
        adapter.image_processor.save_pretrained(tmp)
        del merged
        gc.collect()  # free the merged copy before the verification reload
        reloaded, info = model_cls.from_pretrained(tmp, dtype=dtype, local_files_only=True,
                                                   output_loading_info=True)
        if info.get("missing_keys"):
            raise ExportError(f"the saved checkpoint lacks weights: {sorted(info['missing_keys'])[:10]}")
        state = reloaded.state_dict()
        bad = sorted(src for key, srcs in expected.items()
                     if key not in state or checksum(state[key]) != sums[key] for src in srcs)
        if bad:
            raise ExportError(f"trained parameters did not survive save + reload: {bad}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, out_dir)


def export_adapter(adapter: nn.Module, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Save the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) and every trained
    non-LoRA parameter (``trained_modules.safetensors`` + ``trained_modules.json``) to ``out_dir``.

    Every trainable parameter must be covered by one of the two weight files with the same bytes,
    else ExportError. The index also records the adapter class and frame size, so
    ``load_adapter_export`` can rebuild the adapter from the base model directory. Returns ``out_dir``.
    """
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    peft_model = peft_model_of(adapter)
    if peft_model is None:
        raise ExportError("export_adapter needs a LoRA model (apply_lora); use export_merged instead")
    lora, other = _trained(adapter)
    # Which key PEFT writes for each LoRA parameter: PEFT's state dict holds views of the same
    # storage, so match by data pointer instead of re-implementing PEFT's key renaming.
    peft_keys = {(t.data_ptr(), tuple(t.shape)): key for key, t in get_peft_model_state_dict(peft_model).items()}
    lora_keys = {name: peft_keys.get((p.data_ptr(), tuple(p.shape))) for name, p in lora.items()}
    left_out = sorted(name for name, key in lora_keys.items() if key is None)
    if left_out:
        raise ExportError(f"trained LoRA parameters missing from the PEFT adapter state: {left_out}")

    tmp = _fresh_dir(out_dir, overwrite)
    try:
        peft_model.save_pretrained(tmp)
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in other.items()}
        save_file(tensors, tmp / TRAINED_MODULES_FILE, metadata={"format": INDEX_FORMAT})
        index = {
            "format": INDEX_FORMAT,
            "adapter_class": f"{type(adapter).__module__}.{type(adapter).__qualname__}",
            "frame_size": list(adapter.frame_size),
            "parameters": {name: {"part": safe_part(adapter, f"hf.{name}"), "shape": list(p.shape),
                                  "dtype": str(p.dtype).removeprefix("torch.")} for name, p in other.items()},
        }
        (tmp / TRAINED_MODULES_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _verify_files(tmp, {lora_keys[n]: p for n, p in lora.items()}, "adapter_model.safetensors")
        _verify_files(tmp, other, TRAINED_MODULES_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, out_dir)


def _verify_files(directory: Path, expected: dict[str, torch.Tensor], filename: str) -> None:
    """Every ``expected`` key is in ``directory/filename`` with the same bytes, else ExportError."""
    path = directory / filename
    if not path.is_file():
        raise ExportError(f"{filename} was not written; trained parameters {sorted(expected)[:5]} would be lost")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        bad = sorted(k for k, t in expected.items() if k not in keys or checksum(f.get_tensor(k)) != checksum(t))
    if bad:
        raise ExportError(f"trained parameters missing or different in {filename}: {bad}")


def _adapter_class(qualified: str) -> type:
    """The adapter class named in the index: only a vlmtrain HF adapter (an ``nn.Module`` of
    ``vlmtrain.models`` with ``from_pretrained`` and a ``family``) is accepted."""
    module_name, _, cls_name = qualified.rpartition(".")
    cls = None
    if module_name.startswith("vlmtrain.models."):
        cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_pretrained")
            and getattr(cls, "family", "")):
        raise ValueError(f"{qualified!r} is not a vlmtrain HF adapter class")
    return cls


def load_adapter_export(base_model_dir: str | Path, export_dir: str | Path, trainable: bool = False,
                        dtype: torch.dtype = torch.float32, frame_size: Optional[tuple[int, int]] = None):
    """Rebuild a trained adapter: the base checkpoint, the PEFT adapter injected into it (in place,
    as ``apply_lora`` does) and the trained non-LoRA modules copied in.

    ``trainable=True`` makes LoRA weights and the trained modules trainable again (to resume); else
    everything is frozen. ``frame_size`` defaults to the one recorded at export.
    """
    from peft import PeftModel

    export_dir = Path(export_dir)
    index = json.loads((export_dir / TRAINED_MODULES_INDEX).read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{export_dir / TRAINED_MODULES_INDEX}: unknown format {index.get('format')!r}")
    cls = _adapter_class(index["adapter_class"])
    adapter = cls.from_pretrained(base_model_dir, frame_size=frame_size or tuple(index["frame_size"]), dtype=dtype)
    peft_model = PeftModel.from_pretrained(adapter.hf, export_dir, is_trainable=trainable)
    attach_peft_model(adapter, peft_model)

    tensors = load_file(export_dir / TRAINED_MODULES_FILE)
    if set(tensors) != set(index["parameters"]):
        raise ValueError(f"{TRAINED_MODULES_FILE} and {TRAINED_MODULES_INDEX} disagree: "
                         f"{sorted(set(tensors) ^ set(index['parameters']))}")
    params = dict(adapter.hf.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"trained modules not found in the base model: {unknown}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} in the export, "
                                 f"{tuple(params[name].shape)} in the base model")
            params[name].copy_(tensor)
            params[name].requires_grad_(trainable)
    return adapter
