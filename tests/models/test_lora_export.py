"""LoRA (PEFT) on every HF adapter, and both exports, on tiny random models (CPU, fp32).

One module-scoped fixture per family builds a tiny checkpoint, freezes vision + LLM (the projector
stays fully trainable), applies LoRA and takes a few AdamW steps on the adapter's own three-call
loss; the tests then check the counts, the learning, and that both exports reproduce the trained
model's logits through the HF forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText

from vlmtrain.models.export import (ExportError, checksum, export_adapter, export_merged,
                                    load_adapter_export)
from vlmtrain.models.protocol import IGNORE_INDEX, Turn
from vlmtrain.models.idefics3 import Idefics3Adapter
from vlmtrain.models.llava import LlavaAdapter
from vlmtrain.models.lora import (LoraSettings, apply_lora, format_trainable, is_lora_param,
                                  peft_model_of, resolve_targets)
from vlmtrain.models.tiny_idefics3 import save_tiny_idefics3
from vlmtrain.models.tiny_llava import save_tiny_llava

try:  # written in parallel by another helper; covered whenever it imports
    from vlmtrain.models.qwen_vl import load_qwen_vl
    from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl
    QWEN_SKIP = ""
except ImportError as err:  # pragma: no cover - depends on the checkout
    QWEN_SKIP = f"Qwen-VL adapter not importable: {err}"

FRAME = (32, 32)  # every tiny family takes 32x32 frames -> 16 LM tokens per frame


def _load(family: str, path):
    if family == "llava":
        return LlavaAdapter.from_pretrained(path)
    if family == "idefics3":
        return Idefics3Adapter.from_pretrained(path)
    return load_qwen_vl(path, frame_size=FRAME)


def _save(family: str, path):
    if family == "llava":
        return save_tiny_llava(path, text="llama", seed=0)
    if family == "idefics3":
        return save_tiny_idefics3(path, seed=0)
    return save_tiny_qwen_vl(path, family=family, seed=0)


FAMILIES = ["llava", "idefics3"] + [
    pytest.param(f, marks=pytest.mark.skipif(bool(QWEN_SKIP), reason=QWEN_SKIP or "qwen available"))
    for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
]

CONVERSATIONS = [
    [Turn("user", "<image>\nwhere is the door?"), Turn("assistant", "turn left")],
    [Turn("system", "you are a robot"), Turn("user", "<image><image> go to the red door"),
     Turn("assistant", "forward"), Turn("user", "now <image>?"), Turn("assistant", "stop")],
]
SLOT_FRAMES = torch.tensor([0, 1, 0, 2])  # 4 slots over 3 unique frames, frame 0 repeated
STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@dataclass
class Batch:
    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    unique: object  # FrameBatch of the unique frames


def _batch(adapter) -> Batch:
    encoded = [adapter.encode_conversation(c) for c in CONVERSATIONS]
    length = max(len(e.input_ids) for e in encoded)

    def padded(rows, value):
        return torch.tensor([r + [value] * (length - len(r)) for r in rows])

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    return Batch(padded([e.input_ids for e in encoded], adapter.tokenizer.pad_token_id),
                 padded([e.labels for e in encoded], IGNORE_INDEX),
                 padded([[1] * len(e.input_ids) for e in encoded], 0), adapter.preprocess(images))


def _adapter_loss(adapter, b: Batch) -> torch.Tensor:
    """The training path: encode unique frames once, fill slots, LM loss."""
    embeds = adapter.embed(b.ids, adapter.encode_images(b.unique), SLOT_FRAMES)
    return adapter.forward_lm(embeds, b.labels, b.mask, adapter.position_ids(b.ids, b.mask, b.unique, SLOT_FRAMES))


def _hf_logits(adapter, b: Batch) -> torch.Tensor:
    """Logits of the HF model's own forward, with the inputs the adapter's ``hf_loss`` builds."""
    captured = []
    hook = adapter.hf.register_forward_hook(lambda module, args, out: captured.append(out.logits))
    try:
        with torch.no_grad():
            adapter.hf_loss(b.ids, b.labels, b.mask, b.unique.select(SLOT_FRAMES))
    finally:
        hook.remove()
    return captured[0]


def _freeze_all_but_projector(adapter) -> None:
    for name, param in adapter.named_parameters():
        param.requires_grad_(adapter.part_of(name) == "projector")


@dataclass
class Trained:
    family: str
    path: object
    adapter: object
    batch: Batch
    counts: dict
    base_sums: dict  # checksums of every non-LoRA frozen parameter before training
    losses: tuple  # (eval loss before, eval loss after)
    reached: set  # names of the trainable parameters that received a gradient


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory) -> Trained:
    family = request.param
    path = _save(family, tmp_path_factory.mktemp(f"tiny_{family}"))
    adapter = _load(family, path)
    _freeze_all_but_projector(adapter)
    counts = apply_lora(adapter, LoraSettings())
    base_sums = {n: checksum(p) for n, p in adapter.named_parameters() if not p.requires_grad}
    batch = _batch(adapter)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    adapter.eval()
    with torch.no_grad():
        before = float(_adapter_loss(adapter, batch))
    adapter.train()
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        _adapter_loss(adapter, batch).backward()
        optimizer.step()
    reached = {n for n, p in adapter.named_parameters() if p.grad is not None}
    optimizer.zero_grad(set_to_none=True)
    adapter.eval()  # LoRA dropout off: exports are compared deterministically
    with torch.no_grad():
        after = float(_adapter_loss(adapter, batch))
    return Trained(family, path, adapter, batch, counts, base_sums, (before, after), reached)


# -- (a) apply_lora ------------------------------------------------------------------------------
def test_apply_lora_counts_and_freezing(trained):
    counts, adapter = trained.counts, trained.adapter
    parts = counts["parts"]
    assert parts["llm"]["lora"] > 0 and parts["vision"]["lora"] > 0
    assert parts["projector"]["lora"] == 0
    # The projector was trainable before LoRA and must stay fully trainable; nothing else is.
    assert parts["projector"]["other_trainable"] == parts["projector"]["total"] > 0
    assert parts["llm"]["other_trainable"] == parts["vision"]["other_trainable"] == 0
    lora_numel = sum(p.numel() for n, p in adapter.named_parameters() if is_lora_param(n))
    assert counts["lora"] == lora_numel
    assert counts["total"] == sum(p.numel() for p in adapter.parameters())
    for name, param in adapter.named_parameters():
        assert param.requires_grad == (is_lora_param(name) or adapter.part_of(name) == "projector"), name
    # The adapter paths still reach the original submodules (LoRA injected in place).
    assert ".base_layer." in "".join(n for n, _ in adapter.named_parameters())
    assert peft_model_of(adapter).get_base_model() is adapter.hf
    with pytest.raises(RuntimeError, match="already has LoRA"):
        apply_lora(adapter, LoraSettings())
    line = format_trainable(counts)
    assert line.startswith("trainable ") and "LoRA r=16" in line and "projector" in line


def test_targets_are_restricted_by_part(trained):
    adapter = trained.adapter
    llm_only = resolve_targets(adapter, LoraSettings(parts=("llm",)))
    vision_only = resolve_targets(adapter, LoraSettings(parts=("vision",)))
    assert llm_only and vision_only and not set(llm_only) & set(vision_only)
    assert {adapter.part_of(f"hf.{n}.weight") for n in llm_only} == {"llm"}
    assert {adapter.part_of(f"hf.{n}.weight") for n in vision_only} == {"vision"}
    # The same suffix in both parts is told apart by part (q_proj in SigLIP; MLP names in Qwen2.5-VL).
    shared = {n.rsplit(".", 1)[-1] for n in llm_only} & {n.rsplit(".", 1)[-1] for n in vision_only}
    if trained.family in ("llava", "idefics3", "qwen2_5_vl"):
        assert shared, "expected a suffix present in both the LLM and the vision tower"
    assert resolve_targets(adapter, LoraSettings()) == sorted(llm_only + vision_only)


# -- (b) training --------------------------------------------------------------------------------
def test_training_moves_lora_and_lowers_loss(trained):
    adapter = trained.adapter
    before, after = trained.losses
    assert after < before - 1e-3, trained.losses
    # PEFT initialises B to zero; every B on the loss path must have moved. (LLaVA's SigLIP head and
    # the tower's last layer are not on it: vision_feature_layer=-2, so those B stay zero.)
    lora_b = {n: p for n, p in adapter.named_parameters() if ".lora_B." in n and n in trained.reached}
    assert {adapter.part_of(n) for n in lora_b} == {"llm", "vision"}
    assert all(float(p.detach().abs().sum()) > 0 for p in lora_b.values())
    changed = [n for n, p in adapter.named_parameters()
               if n in trained.base_sums and checksum(p) != trained.base_sums[n]]
    assert changed == [], "frozen base weights moved"
    # The split path and HF's own forward agree through the LoRA layers too.
    with torch.no_grad():
        reference = adapter.hf_loss(trained.batch.ids, trained.batch.labels, trained.batch.mask,
                                    trained.batch.unique.select(SLOT_FRAMES))
        torch.testing.assert_close(_adapter_loss(adapter, trained.batch), reference, rtol=1e-5, atol=1e-5)


# -- (c) merged export ---------------------------------------------------------------------------
def test_export_merged_reproduces_logits(trained, tmp_path):
    adapter = trained.adapter
    sums = {n: checksum(p) for n, p in adapter.named_parameters()}
    out = export_merged(adapter, tmp_path / "merged")
    assert {n: checksum(p) for n, p in adapter.named_parameters()} == sums, "export mutated the training model"
    assert peft_model_of(adapter) is not None

    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model) is type(adapter.hf)
    assert not any("lora_" in n or "base_layer" in n for n, _ in model.named_parameters())
    # Tokenizer and image processor travel with it: the adapter's own loader reads the directory.
    exported = _load(trained.family, out)
    assert exported.encode_conversation(CONVERSATIONS[1]).input_ids == \
        adapter.encode_conversation(CONVERSATIONS[1]).input_ids
    reloaded = type(adapter)(model.eval(), exported.tokenizer, exported.image_processor, adapter.frame_size)
    expected = _hf_logits(adapter, trained.batch)
    # Merged (W + s*BA) x and unmerged W x + s*B(A x) round differently in fp32; the Qwen tiny models'
    # large init puts logits around +-1, hence a small relative term next to atol (observed max 1.2e-5
    # on one of 80 000 logits; the untrained control below differs by > 1e-3).
    torch.testing.assert_close(_hf_logits(reloaded, trained.batch), expected, rtol=1e-4, atol=3e-5)
    # ... and the trained weights matter: the untrained base model gives different logits.
    base = _load(trained.family, trained.path).eval()
    assert (_hf_logits(base, trained.batch) - expected).abs().max() > 1e-3


# -- (d) adapter export --------------------------------------------------------------------------
def test_export_adapter_roundtrip(trained, tmp_path):
    adapter = trained.adapter
    out = export_adapter(adapter, tmp_path / "adapter")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trained_modules.safetensors",
            "trained_modules.json"} <= names
    rebuilt = load_adapter_export(trained.path, out).eval()
    assert type(rebuilt) is type(adapter)
    torch.testing.assert_close(_hf_logits(rebuilt, trained.batch), _hf_logits(adapter, trained.batch),
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(_adapter_loss(rebuilt, trained.batch), _adapter_loss(adapter, trained.batch))
    assert not any(p.requires_grad for p in rebuilt.parameters())  # inference by default
    # Resuming: the same parameters are trainable again as in the training model.
    resumed = load_adapter_export(trained.path, out, trainable=True)
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(resumed) == trainable(adapter)


# -- (e) a trained parameter that cannot be exported -------------------------------------------
def test_untracked_trained_parameter_fails_both_exports(trained, tmp_path):
    adapter = trained.adapter
    adapter.register_parameter("slot_age_scale", nn.Parameter(torch.ones(4)))  # outside adapter.hf
    try:
        with pytest.raises(ExportError, match="slot_age_scale"):
            export_merged(adapter, tmp_path / "merged")
        with pytest.raises(ExportError, match="slot_age_scale"):
            export_adapter(adapter, tmp_path / "adapter")
    finally:
        del adapter.slot_age_scale
    assert list(tmp_path.iterdir()) == [], "a failed export must leave nothing behind"


def test_filtered_trained_weight_fails_merged_export(trained, tmp_path):
    """A trained projector weight that ``save_pretrained`` would filter out is named, not dropped."""
    adapter = trained.adapter
    projector = next(n[len("hf."):] for n, p in adapter.named_parameters()
                     if p.requires_grad and adapter.part_of(n) == "projector")
    adapter.hf._keys_to_ignore_on_save = [projector]  # instance attribute: copied into the merge copy
    try:
        with pytest.raises(ExportError, match=projector.replace(".", r"\.")):
            export_merged(adapter, tmp_path / "merged")
    finally:
        del adapter.hf._keys_to_ignore_on_save
    assert list(tmp_path.iterdir()) == []


# -- (f) target errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_unknown_target_lists_available_names(family, tmp_path):
    adapter = _load(family, _save(family, tmp_path / family))
    with pytest.raises(ValueError, match=r"\['not_a_layer'\].*available linear module suffixes.*q_proj"):
        apply_lora(adapter, LoraSettings(target_modules=("q_proj", "not_a_layer")))
    # fc1 exists only in the vision tower: asking for it in the LLM alone is an error too.
    with pytest.raises(ValueError, match=r"\['fc1'\].*only in other parts"):
        apply_lora(adapter, LoraSettings(target_modules=("fc1",), parts=("llm",)))
    assert peft_model_of(adapter) is None and not any("lora_" in n for n, _ in adapter.named_parameters())
    with pytest.raises(ValueError, match="parts"):
        LoraSettings(parts=("decoder",))


def test_llm_only_lora_survives_the_adapter_roundtrip(tmp_path):
    """SigLIP and Llama both have q/k/v_proj: LoRA on the LLM alone must stay there, in training and
    after PEFT writes (and may compress) the explicit target list to adapter_config.json."""
    path = _save("llava", tmp_path / "llava")
    adapter = _load("llava", path)
    _freeze_all_but_projector(adapter)
    counts = apply_lora(adapter, LoraSettings(parts=("llm",), target_modules=("q_proj", "v_proj")))
    assert counts["parts"]["vision"]["lora"] == 0 and counts["parts"]["llm"]["lora"] > 0
    lora_names = sorted(n for n, _ in adapter.named_parameters() if is_lora_param(n))
    assert {adapter.part_of(n) for n in lora_names} == {"llm"}
    assert counts["lora_modules"] == 4  # 2 layers x (q_proj, v_proj)
    rebuilt = load_adapter_export(path, export_adapter(adapter, tmp_path / "out"))
    assert sorted(n for n, _ in rebuilt.named_parameters() if is_lora_param(n)) == lora_names


def test_lora_dropout_is_dropout_with_a_cheaper_mask(trained):
    from vlmtrain.models.lora import LoraDropout

    drops = [m.lora_dropout["default"] for m in trained.adapter.hf.modules() if hasattr(m, "lora_dropout")]
    assert drops and all(isinstance(d, LoraDropout) for d in drops)  # PEFT's nn.Dropout replaced everywhere
    p = 0.25
    drop = LoraDropout(p).train()
    x = torch.full((400, 500), 3.0, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    # Each element kept with probability 1 - p (200k draws: 4 sigma is 0.4 %), kept ones scaled by 1 / (1 - p).
    assert abs(kept.float().mean().item() - (1 - p)) < 0.004
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 3.0 / (1 - p)))
    y.sum().backward()  # the gradient flows through kept elements only, with the same scale
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # reproducible from the torch seed
    assert not torch.equal(drop(x), y)  # and a fresh mask per call
    assert torch.equal(drop.eval()(x), x) and torch.equal(LoraDropout(0.0).train()(x), x)
