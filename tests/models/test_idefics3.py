"""Idefics3/SmolVLM adapter: the split three-call loss equals the HF model's own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, Idefics3Processor

from vlmtrain.models.protocol import IGNORE_INDEX, Turn
from vlmtrain.models.idefics3 import Idefics3Adapter
from vlmtrain.models.tiny_idefics3 import save_tiny_idefics3

# Sample 0 has 1 image, sample 1 has 3; unique frame 0 fills slots 0 and 2 (a repeated frame).
CONVERSATIONS = [
    [Turn("user", "<image>\nwhere is the door?"), Turn("assistant", "turn left")],
    [Turn("system", "you are a robot"), Turn("user", "<image><image> go to the red door"),
     Turn("assistant", "forward"), Turn("user", "now <image>?"), Turn("assistant", "stop")],
]
ANSWERS = [["turn left"], ["forward", "stop"]]
SLOT_FRAMES = torch.tensor([0, 1, 0, 2])


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"), seed=0)


@pytest.fixture(scope="module")
def adapter(tiny_path):
    return Idefics3Adapter.from_pretrained(tiny_path)


def _images(sizes=((40, 50), (45, 50), (50, 50))) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _batch(adapter):
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


def _adapter_loss(adapter, slot_frames=SLOT_FRAMES):
    _, ids, labels, mask = _batch(adapter)
    unique = adapter.preprocess(_images())
    features = adapter.encode_images(unique)
    embeds = adapter.embed(ids, features, slot_frames)
    position_ids = adapter.position_ids(ids, mask)
    return adapter.forward_lm(embeds, labels, mask, position_ids)


def _assert_matches_hf(adapter):
    encoded, ids, labels, mask = _batch(adapter)
    assert [e.num_images for e in encoded] == [1, 3]
    unique = adapter.preprocess(_images())
    features = adapter.encode_images(unique)
    text_cfg = adapter.hf.config.text_config
    assert features.shape == (3, adapter.tokens_per_frame(), text_cfg.hidden_size)
    with torch.no_grad():
        loss = _adapter_loss(adapter)
        reference = adapter.hf_loss(ids, labels, mask, unique.select(SLOT_FRAMES))
        # The images must matter, or the comparison would not test the image path at all.
        swapped = _adapter_loss(adapter, SLOT_FRAMES.flip(0))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert (swapped - reference).abs() > 1e-4


def test_loss_matches_hf(adapter):
    _assert_matches_hf(adapter)


def test_labels_only_on_assistant_answers(adapter):
    tok = adapter.tokenizer
    for enc, answers in zip(_batch(adapter)[0], ANSWERS):
        ids, labels = torch.tensor(enc.input_ids), torch.tensor(enc.labels)
        labelled = labels != IGNORE_INDEX
        assert torch.equal(labels[labelled], ids[labelled])
        # Contiguous labelled runs, each exactly " {answer}<end_of_utterance>".
        edges = torch.diff(labelled.int(), prepend=torch.tensor([0]), append=torch.tensor([0]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        runs = [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]
        assert runs == [f" {a}<end_of_utterance>" for a in answers]
        for s in starts:  # every run follows the assistant prefix
            prefix = tok.encode("Assistant:", add_special_tokens=False)
            assert ids[s - len(prefix):s].tolist() == prefix
        image_positions = ids == adapter.image_token_id
        assert int(image_positions.sum()) == enc.num_images * adapter.tokens_per_frame()
        assert not labelled[image_positions].any()


def test_placeholders_and_pixels_match_hf_processor(adapter, tiny_path):
    """Our hand-built expansion equals what HF's Idefics3Processor writes for unsplit images."""
    processor = Idefics3Processor(
        image_processor=AutoImageProcessor.from_pretrained(tiny_path, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_path), image_seq_len=adapter.tokens_per_frame())
    images = _images(((32, 32), (32, 32)))  # already frame-sized: both resize paths are no-ops
    text = "<image> go <image>to the door"
    ref = processor(text=[f"User:{text}"], images=[images], do_image_splitting=False, return_tensors="pt")
    enc = adapter.encode_conversation([Turn("user", text)])
    bos = [adapter.tokenizer.bos_token_id]
    tail = [adapter.tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    tail += adapter.tokenizer.encode("\n", add_special_tokens=False)
    assert enc.input_ids == bos + ref["input_ids"][0].tolist() + tail
    torch.testing.assert_close(adapter.preprocess(images).pixels, ref["pixel_values"][0])


def test_embed_rejects_slot_mismatch(adapter):
    _, ids, _, _ = _batch(adapter)
    features = adapter.encode_images(adapter.preprocess(_images()))
    with pytest.raises(ValueError, match="image-pad positions"):
        adapter.embed(ids, features, SLOT_FRAMES[:-1])


def test_part_of_covers_every_parameter(adapter):
    parts = {name: adapter.part_of(name) for name, _ in adapter.named_parameters()}
    assert set(parts.values()) == {"vision", "projector", "llm"}
    assert parts["hf.lm_head.weight"] == "llm"
    assert all(p == "projector" for n, p in parts.items() if ".connector." in n)
    with pytest.raises(ValueError):
        adapter.part_of("hf.some_new_head.weight")


def test_backward_reaches_all_parts(adapter):
    adapter.zero_grad(set_to_none=True)
    _adapter_loss(adapter).backward()
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


def test_frame_size_must_be_square_and_divisible(tiny_path):
    with pytest.raises(ValueError, match="square"):
        Idefics3Adapter.from_pretrained(tiny_path, frame_size=(32, 24))
    with pytest.raises(ValueError, match="divisible"):
        Idefics3Adapter.from_pretrained(tiny_path, frame_size=(36, 36))
    bigger = Idefics3Adapter.from_pretrained(tiny_path, frame_size=(48, 48))
    assert bigger.tokens_per_frame() == (48 // 4) ** 2 // 4
    _assert_matches_hf(bigger)  # frames larger than the vision image_size still match HF
