"""Checks shared by the two-tower adapters (Idefics3/SmolVLM; LLaVA with Llama and Qwen2 LMs): the split
three-call loss equals the HF model's own forward, labels, slots, parts and gradients.

Each family is one row of ``FAMILIES``; the checks only one family has (end of the module) pick their
rows by parametrizing the ``family`` fixture indirectly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, Idefics3Processor, LlavaProcessor

from vlmtrain.data.loader import collate
from vlmtrain.data.samples import TokenizedSample
from vlmtrain.models.idefics3 import Idefics3Adapter
from vlmtrain.models.llava import LlavaAdapter
from vlmtrain.models.protocol import IGNORE_INDEX, Turn
from vlmtrain.models.tiny_idefics3 import save_tiny_idefics3
from vlmtrain.models.registry import load_adapter
from vlmtrain.models.tiny_llava import TINY_PATCH, save_tiny_llava
from vlmtrain.train.step import batch_loss

# Sample 0 has 1 image, sample 1 has 3; unique frame 0 fills slots 0 and 2 (a repeated frame).
CONVERSATIONS = [
    [Turn("user", "<image>\nwhere is the door?"), Turn("assistant", "turn left")],
    [Turn("system", "you are a robot"), Turn("user", "<image><image> go to the red door"),
     Turn("assistant", "forward"), Turn("user", "now <image>?"), Turn("assistant", "stop")],
]
ANSWERS = [["turn left"], ["forward", "stop"]]
SLOT_FRAMES = torch.tensor([0, 1, 0, 2])


@dataclass(frozen=True)
class Family:
    """One tiny checkpoint of an adapter family and what its chat template writes."""

    id: str
    adapter_cls: type
    save: Callable[[Path], Path]  # writes the tiny checkpoint into a folder and returns its path
    end_token: str  # closes every assistant answer
    assistant_prefix: str  # stands right before every assistant answer
    # Parameter-name substring -> the part every parameter containing it belongs to.
    part_markers: dict[str, str] = field(default_factory=dict)


IDEFICS3 = Family("idefics3", Idefics3Adapter, partial(save_tiny_idefics3, seed=0),
                  end_token="<end_of_utterance>", assistant_prefix="Assistant:",
                  part_markers={".connector.": "projector"})

# (text model, vision_feature_select_strategy): both LMs, and the CLS-dropping "default" strategy once.
LLAVA_VARIANTS = [("llama", "full"), ("qwen2", "full"), ("llama", "default")]
LLAVA_EOS = {"llama": "</s>", "qwen2": "<|im_end|>"}  # the tiny tokenizers' eos tokens
LLAVA = [Family(f"llava-{text}-{strategy}", LlavaAdapter,
                partial(save_tiny_llava, text=text, seed=0, feature_strategy=strategy),
                end_token=LLAVA_EOS[text], assistant_prefix="ASSISTANT:",
                part_markers={".multi_modal_projector.": "projector", ".vision_tower.": "vision"})
         for text, strategy in LLAVA_VARIANTS]

FAMILIES = [IDEFICS3, *LLAVA]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.id)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tiny_path(family, tmp_path_factory):
    """The family's tiny model, built once per module."""
    return family.save(tmp_path_factory.mktemp(f"tiny_{family.id}"))


@pytest.fixture(scope="module")
def adapter(family, tiny_path):
    return family.adapter_cls.from_pretrained(tiny_path)


def images(sizes=((40, 50), (45, 50), (50, 50))) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def batch(adapter):
    """Right-padded input_ids, labels, attention_mask of CONVERSATIONS."""
    encoded = [adapter.encode_conversation(c) for c in CONVERSATIONS]
    length = max(len(e.input_ids) for e in encoded)
    pad = adapter.tokenizer.pad_token_id

    def padded(rows, value):
        return torch.tensor([r + [value] * (length - len(r)) for r in rows])

    ids = padded([e.input_ids for e in encoded], pad)
    labels = padded([e.labels for e in encoded], IGNORE_INDEX)
    mask = padded([[1] * len(e.input_ids) for e in encoded], 0)
    assert mask[0].sum() != mask[1].sum(), "the samples must differ in length to exercise padding"
    return encoded, ids, labels, mask


def adapter_loss(adapter, slot_frames=SLOT_FRAMES):
    _, ids, labels, mask = batch(adapter)
    unique = adapter.preprocess(images())
    features = adapter.encode_images(unique)
    embeds = adapter.embed(ids, features, slot_frames)
    position_ids = adapter.position_ids(ids, mask)
    return adapter.forward_lm(embeds, labels, mask, position_ids)


def assert_matches_hf(adapter):
    encoded, ids, labels, mask = batch(adapter)
    assert [e.num_images for e in encoded] == [1, 3]
    unique = adapter.preprocess(images())
    features = adapter.encode_images(unique)
    text_cfg = adapter.hf.config.text_config
    assert features.shape == (3, adapter.tokens_per_frame(), text_cfg.hidden_size)
    with torch.no_grad():
        loss = adapter_loss(adapter)
        reference = adapter.hf_loss(ids, labels, mask, unique.select(SLOT_FRAMES))
        # The images must matter, or the comparison would not test the image path at all.
        swapped = adapter_loss(adapter, SLOT_FRAMES.flip(0))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert (swapped - reference).abs() > 1e-4


def test_loss_matches_hf(adapter):
    assert_matches_hf(adapter)


def test_labels_only_on_assistant_answers(adapter, family):
    tok = adapter.tokenizer
    for enc, answers in zip(batch(adapter)[0], ANSWERS):
        ids, labels = torch.tensor(enc.input_ids), torch.tensor(enc.labels)
        labelled = labels != IGNORE_INDEX
        assert torch.equal(labels[labelled], ids[labelled])
        # Contiguous labelled runs, each exactly " {answer}{end token}".
        edges = torch.diff(labelled.int(), prepend=torch.tensor([0]), append=torch.tensor([0]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        runs = [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]
        assert runs == [f" {a}{family.end_token}" for a in answers]
        for s in starts:  # every run follows the assistant prefix
            prefix = tok.encode(family.assistant_prefix, add_special_tokens=False)
            assert ids[s - len(prefix):s].tolist() == prefix
        image_positions = ids == adapter.image_token_id
        assert int(image_positions.sum()) == enc.num_images * adapter.tokens_per_frame()
        assert not labelled[image_positions].any()


def test_embed_rejects_slot_mismatch(adapter):
    _, ids, _, _ = batch(adapter)
    features = adapter.encode_images(adapter.preprocess(images()))
    with pytest.raises(ValueError, match="image-pad positions"):
        adapter.embed(ids, features, SLOT_FRAMES[:-1])


def test_part_of_covers_every_parameter(adapter, family):
    parts = {name: adapter.part_of(name) for name, _ in adapter.named_parameters()}
    assert set(parts.values()) == {"vision", "projector", "llm"}
    assert parts["hf.lm_head.weight"] == "llm"
    for marker, part in family.part_markers.items():
        assert all(p == part for n, p in parts.items() if marker in n), marker
    with pytest.raises(ValueError):
        adapter.part_of("hf.some_new_head.weight")


def test_backward_reaches_all_parts(adapter):
    adapter.zero_grad(set_to_none=True)
    adapter_loss(adapter).backward()
    grads = {"vision": 0.0, "projector": 0.0, "llm": 0.0}
    for name, param in adapter.named_parameters():
        if param.grad is not None:
            grads[adapter.part_of(name)] += float(param.grad.abs().sum())
    adapter.zero_grad(set_to_none=True)
    assert all(g > 0 for g in grads.values()), grads


def test_tiny_checkpoint_loads_with_auto_classes(tiny_path, adapter):
    model = AutoModelForImageTextToText.from_pretrained(tiny_path)
    assert type(model) is type(adapter.hf)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


# -- what only Idefics3 has ---------------------------------------------------------------------
@pytest.mark.parametrize("family", [IDEFICS3], indirect=True, ids=lambda f: f.id)
def test_idefics3_placeholders_and_pixels_match_hf_processor(adapter, tiny_path):
    """Our hand-built expansion equals what HF's Idefics3Processor writes for unsplit images."""
    processor = Idefics3Processor(
        image_processor=AutoImageProcessor.from_pretrained(tiny_path, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_path), image_seq_len=adapter.tokens_per_frame())
    frames = images(((32, 32), (32, 32)))  # already frame-sized: both resize paths are no-ops
    text = "<image> go <image>to the door"
    ref = processor(text=[f"User:{text}"], images=[frames], do_image_splitting=False, return_tensors="pt")
    enc = adapter.encode_conversation([Turn("user", text)])
    bos = [adapter.tokenizer.bos_token_id]
    tail = [adapter.tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    tail += adapter.tokenizer.encode("\n", add_special_tokens=False)
    assert enc.input_ids == bos + ref["input_ids"][0].tolist() + tail
    torch.testing.assert_close(adapter.preprocess(frames).pixels, ref["pixel_values"][0])


@pytest.mark.parametrize("family", [IDEFICS3], indirect=True, ids=lambda f: f.id)
def test_idefics3_frame_size_must_be_square_and_divisible(tiny_path):
    with pytest.raises(ValueError, match="square"):
        Idefics3Adapter.from_pretrained(tiny_path, frame_size=(32, 24))
    with pytest.raises(ValueError, match="divisible"):
        Idefics3Adapter.from_pretrained(tiny_path, frame_size=(36, 36))
    bigger = Idefics3Adapter.from_pretrained(tiny_path, frame_size=(48, 48))
    assert bigger.tokens_per_frame() == (48 // 4) ** 2 // 4
    assert_matches_hf(bigger)  # frames larger than the vision image_size still match HF


# -- what only LLaVA has ------------------------------------------------------------------------
@pytest.mark.parametrize("family", LLAVA, indirect=True, ids=lambda f: f.id)
def test_llava_placeholders_and_pixels_match_hf_processor(adapter, tiny_path):
    """Our hand-built expansion and pixels equal what HF's LlavaProcessor produces."""
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(tiny_path, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_path), patch_size=TINY_PATCH,
        vision_feature_select_strategy=adapter.hf.config.vision_feature_select_strategy)
    frames = images()  # not frame-sized: the SigLIP processor resizes straight to 32x32 like we do
    text = "<image> go <image>to the door"
    ref = processor(text=[f"USER: {text}\n"], images=frames[:2], return_tensors="pt")
    enc = adapter.encode_conversation([Turn("user", text)])
    bos = [] if adapter.tokenizer.bos_token_id is None else [adapter.tokenizer.bos_token_id]
    assert enc.input_ids == bos + ref["input_ids"][0].tolist()
    torch.testing.assert_close(adapter.preprocess(frames[:2]).pixels, ref["pixel_values"])


@pytest.mark.parametrize("family", LLAVA, indirect=True, ids=lambda f: f.id)
def test_llava_frame_size_must_match_the_vision_tower(tiny_path):
    with pytest.raises(ValueError, match="image_size"):
        LlavaAdapter.from_pretrained(tiny_path, frame_size=(48, 48))


def test_llava_unreachable_trainable_are_exactly_the_parameters_without_gradients(tmp_path):
    """What DDP is told to expect without gradients (``find_unused``) is exactly what a backward
    through a trained LLaVA leaves without one: the layers after vision_feature_layer and post_layernorm."""
    adapter = load_adapter("llava", save_tiny_llava(tmp_path / "llava", text="llama"), None)
    enc = adapter.encode_conversation([Turn("user", "<image> where now?"), Turn("assistant", "STOP")])
    h, w = adapter.frame_size
    frames = torch.randint(0, 255, (1, 3, h, w), dtype=torch.uint8)
    batch = collate([TokenizedSample(enc.input_ids, enc.labels, [0])], frames, 0, adapter.image_token_id)
    batch_loss(adapter, batch, torch.device("cpu")).backward()
    no_grad = sorted(n for n, p in adapter.named_parameters() if p.requires_grad and p.grad is None)
    assert no_grad and sorted(adapter.unreachable_trainable()) == no_grad
