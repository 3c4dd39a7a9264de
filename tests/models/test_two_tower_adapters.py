"""Checks shared by the two-tower adapters (Idefics3/SmolVLM; LLaVA with Llama and Qwen2 LMs): the split
three-call loss equals the HF model's own forward, labels, slots, parts and gradients.

Each family is one row of ``FAMILIES``; what only one family has stays in ``test_idefics3.py`` and
``test_llava.py``, which build their tiny models with :func:`family_fixtures` and reuse the helpers here.
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
from transformers import AutoModelForImageTextToText, AutoTokenizer

from vlmtrain.models.idefics3 import Idefics3Adapter
from vlmtrain.models.llava import LlavaAdapter
from vlmtrain.models.protocol import IGNORE_INDEX, Turn
from vlmtrain.models.tiny_idefics3 import save_tiny_idefics3
from vlmtrain.models.tiny_llava import save_tiny_llava

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


def family_fixtures(families: list[Family]):
    """Module-scoped ``family``, ``tiny_path`` and ``adapter`` fixtures over ``families``: each tiny
    model is built once per module. Assign the result to those three names in the test module."""

    @pytest.fixture(scope="module", params=families, ids=lambda f: f.id)
    def family(request):
        return request.param

    @pytest.fixture(scope="module")
    def tiny_path(family, tmp_path_factory):
        return family.save(tmp_path_factory.mktemp(f"tiny_{family.id}"))

    @pytest.fixture(scope="module")
    def adapter(family, tiny_path):
        return family.adapter_cls.from_pretrained(tiny_path)

    return family, tiny_path, adapter


family, tiny_path, adapter = family_fixtures(FAMILIES)


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
