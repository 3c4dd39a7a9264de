"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL adapters against the HF models' own forward (tiny random models, CPU).

The adapter path (unique frames encoded once, slots filled by index, MRoPE from ``position_ids``,
``forward_lm``) must give the same loss as ``hf(...).loss`` with one frame per slot. The tiny models
are initialised with a large std so that wrong positions, slots or deepstack features move the loss
by far more than the tolerance (see ``tiny_qwen._INIT_STD``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtrain.models.protocol import IGNORE_INDEX, Turn
from vlmtrain.models.qwen_vl import ADAPTERS, QwenVLAdapter, load_qwen_vl
from vlmtrain.models.tiny_qwen import save_tiny_qwen_vl

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# Non-square on purpose: a height/width mix-up in MRoPE or in the grid would show.
FRAME = (32, 48)  # 8 x 12 patches of 4 px -> 4 x 6 = 24 merged tokens


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request, tmp_path_factory) -> QwenVLAdapter:
    """One tiny checkpoint per family, written and loaded once for the module."""
    path = save_tiny_qwen_vl(tmp_path_factory.mktemp(request.param), family=request.param, seed=0)
    model = load_qwen_vl(path, frame_size=FRAME)
    assert isinstance(model, ADAPTERS[request.param])
    return model


def _images(n: int, seed: int) -> list[Image.Image]:
    """Random RGB images of assorted sizes (preprocess resizes them all to FRAME)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 56), (31, 47), (64, 64)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


CONVERSATIONS = [
    [Turn("user", "<image> What is in front of you?"), Turn("assistant", "A red chair.")],
    [
        Turn("system", "You are a navigation robot."),
        Turn("user", "History: <image><image>\nNow: <image> Where is the door?"),
        Turn("assistant", "FORWARD then LEFT"),
        Turn("user", "And then?"),
        Turn("assistant", "STOP"),
    ],
]


def _batch(adapter: QwenVLAdapter):
    """Right-padded batch of CONVERSATIONS: input_ids, labels, attention_mask (B, L)."""
    encoded = [adapter.encode_conversation(c) for c in CONVERSATIONS]
    assert [e.num_images for e in encoded] == [1, 3]
    length = max(len(e.input_ids) for e in encoded)
    pad = adapter.tokenizer.pad_token_id
    ids = torch.tensor([e.input_ids + [pad] * (length - len(e.input_ids)) for e in encoded])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (length - len(e.labels)) for e in encoded])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (length - len(e.input_ids)) for e in encoded])
    assert mask[0].sum() < mask[1].sum()  # different lengths: row 0 is padded
    return ids, labels, mask


# Slots in row-major token order -> rows of the unique frames [A, B, C]: sample 0 shows B, sample 1
# shows A, B, A (a repeated history frame) - C is encoded but never used.
SLOT_FRAMES = torch.tensor([1, 0, 1, 0])


def _adapter_loss(adapter: QwenVLAdapter) -> torch.Tensor:
    ids, labels, mask = _batch(adapter)
    frames = adapter.preprocess(_images(3, seed=1))
    feats = adapter.encode_images(frames)
    embeds = adapter.embed(ids, feats, SLOT_FRAMES)
    pos = adapter.position_ids(ids, mask, frames, SLOT_FRAMES)
    return adapter.forward_lm(embeds, labels, mask, pos)


def test_preprocess_and_features_shapes(adapter):
    frames = adapter.preprocess(_images(3, seed=1))
    k = adapter.tokens_per_frame()
    assert k == (32 // 8) * (48 // 8)
    assert frames.pixels.shape == (3, 8 * 12, 3 * 2 * 4 * 4)
    assert frames.meta["image_grid_thw"].tolist() == [[1, 8, 12]] * 3
    feats = adapter.encode_images(frames)
    hidden = adapter.hf.config.text_config.hidden_size
    levels = 1 + (adapter.deepstack_levels if adapter.family == "qwen3_vl" else 0)
    assert feats.shape == (3, k, levels * hidden)


def test_loss_matches_hf(adapter):
    ids, labels, mask = _batch(adapter)
    with torch.no_grad():
        ours = _adapter_loss(adapter)
        unique = adapter.preprocess(_images(3, seed=1))
        reference = adapter.hf_loss(ids, labels, mask, unique.select(SLOT_FRAMES))
    assert torch.isfinite(reference)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_position_ids_without_frames_match(adapter):
    ids, _, mask = _batch(adapter)
    frames = adapter.preprocess(_images(3, seed=1))
    with_frames = adapter.position_ids(ids, mask, frames, SLOT_FRAMES)
    assert with_frames.shape == (3, *ids.shape)
    assert torch.equal(adapter.position_ids(ids, mask), with_frames)
    # Image tokens carry 2D (h, w) positions, so the rows differ there, and text after the images
    # continues from the largest position instead of the token index.
    image = ids == adapter.image_token_id
    assert not torch.equal(with_frames[1][image], with_frames[2][image])
    assert int(with_frames[0, 1].max()) < int(mask[1].sum()) - 1


def test_labels_cover_only_assistant_answers(adapter):
    tok = adapter.tokenizer
    k = adapter.tokens_per_frame()
    enc = adapter.encode_conversation(CONVERSATIONS[0])
    image = "<|vision_start|>" + "<|image_pad|>" * k + "<|vision_end|>"
    expected = (f"<|im_start|>user\n{image} What is in front of you?<|im_end|>\n"
                "<|im_start|>assistant\nA red chair.<|im_end|>\n")
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == expected
    assert len(enc.labels) == len(enc.input_ids)

    enc = adapter.encode_conversation(CONVERSATIONS[1])
    labelled = [i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
    assert all(enc.labels[i] == enc.input_ids[i] for i in labelled)
    # The labelled tokens are exactly the two answers, each with its <|im_end|>, nothing else.
    spans, current = [], []
    for i, lab in enumerate(enc.labels):
        if lab != IGNORE_INDEX:
            current.append(lab)
        elif current:
            spans.append(tok.decode(current, skip_special_tokens=False))
            current = []
    assert spans == ["FORWARD then LEFT<|im_end|>", "STOP<|im_end|>"]
    assert enc.input_ids.count(adapter.image_token_id) == 3 * k


def test_embed_rejects_slot_mismatch(adapter):
    ids, _, mask = _batch(adapter)
    feats = adapter.encode_images(adapter.preprocess(_images(2, seed=1)))
    with pytest.raises(ValueError, match="image-pad positions"):
        adapter.embed(ids, feats, SLOT_FRAMES[:-1])  # 3 slots for 4 images
    # One image-pad token overwritten by text: the slots no longer tile the pad tokens.
    broken = ids.clone()
    first_pad = int(torch.nonzero(broken.view(-1) == adapter.image_token_id)[0])
    broken.view(-1)[first_pad] = adapter.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="image-pad positions"):
        adapter.embed(broken, feats, SLOT_FRAMES)
    with pytest.raises(ValueError, match="image-pad tokens"):
        adapter.position_ids(broken, mask)


def test_frame_size_must_be_a_multiple(adapter):
    with pytest.raises(ValueError, match="multiples of patch_size \\* merge_size = 8"):
        type(adapter)(adapter.hf, adapter.tokenizer, adapter.image_processor, (30, 48))


def test_part_of_covers_every_parameter(adapter):
    parts = {name: adapter.part_of(name) for name, _ in adapter.named_parameters()}
    assert set(parts.values()) == {"vision", "projector", "llm"}
    for name, part in parts.items():
        if "merger" in name:
            assert part == "projector", name
        elif "patch_embed" in name or ".blocks." in name:
            assert part == "vision", name
        elif "lm_head" in name or "language_model" in name:
            assert part == "llm", name
    if adapter.family == "qwen3_vl":
        assert any("deepstack_merger_list" in n and p == "projector" for n, p in parts.items())
    with pytest.raises(ValueError):
        adapter.part_of("something.else.weight")


def test_gradients_reach_every_part(adapter):
    adapter.zero_grad(set_to_none=True)
    try:
        _adapter_loss(adapter).backward()
        nonzero = {"vision": False, "projector": False, "llm": False}
        for name, param in adapter.named_parameters():
            if param.grad is not None and bool(param.grad.abs().sum() > 0):
                nonzero[adapter.part_of(name)] = True
        assert nonzero == {"vision": True, "projector": True, "llm": True}
    finally:
        adapter.zero_grad(set_to_none=True)


def test_batched_vision_attention_equals_hf_per_frame_sdpa(adapter):
    """The tower's one batched SDPA call (models/vision_attention.py) gives HF's per-chunk SDPA result,
    forward and backward, for frames of one size (batched) and of two sizes (chunk by chunk)."""
    from vlmtrain.models.vision_attention import BATCHED

    tower = adapter.hf.model.visual
    assert tower.config._attn_implementation == BATCHED  # what the adapter switched it to
    same = adapter.preprocess(_images(3, seed=2))
    other = QwenVLAdapter.preprocess(adapter, _images(1, seed=3))  # FRAME too; a second grid below
    grid = torch.cat([same.meta["image_grid_thw"], torch.tensor([[1, 4, 8]])])
    mixed_pixels = torch.cat([same.pixels.reshape(-1, same.pixels.shape[-1]),
                              other.pixels.reshape(-1, other.pixels.shape[-1])[:32]])
    for pixels, thw in ((same.pixels.reshape(-1, same.pixels.shape[-1]), same.meta["image_grid_thw"]),
                        (mixed_pixels, grid)):
        results = {}
        for impl in (BATCHED, "sdpa"):
            tower.config._attn_implementation = impl
            adapter.hf.zero_grad(set_to_none=True)
            x = pixels.clone().requires_grad_(True)
            out = tower(x, grid_thw=thw).pooler_output
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results[impl] = (out.detach(), x.grad, tower.blocks[0].attn.qkv.weight.grad.clone())
        tower.config._attn_implementation = BATCHED
        for got, want in zip(results[BATCHED], results["sdpa"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_linear_patch_embed_equals_the_conv3d(adapter):
    from vlmtrain.models.vision_attention import LinearPatchEmbed

    embed = adapter.hf.model.visual.patch_embed
    assert isinstance(embed, LinearPatchEmbed)  # what the adapter switched it to
    assert any(n.endswith("visual.patch_embed.proj.weight") for n, _ in adapter.hf.named_parameters())
    pixels = adapter.preprocess(_images(2, seed=4)).pixels
    flat = pixels.reshape(-1, pixels.shape[-1])
    conv = embed.proj(flat.view(-1, embed.in_channels, embed.temporal_patch_size, embed.patch_size,
                                embed.patch_size)).view(-1, embed.embed_dim)
    torch.testing.assert_close(embed(flat), conv, rtol=1e-5, atol=1e-5)
