"""Every model family, the composed VLM included, implements THE model protocol (models/protocol.py):
the same members with the same signatures, and the same behaviour on the same inputs."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from vlmtrain.config import ModelConfig
from vlmtrain.models.parts import PARTS
from vlmtrain.models.protocol import VLM, FrameBatch, Turn
from vlmtrain.models.registry import load_final

FAMILIES = ["composed", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "llava"]
PROTOCOL_METHODS = sorted(name for name, member in vars(VLM).items()
                          if inspect.isfunction(member) and not name.startswith("_"))
CONVERSATION = [Turn("user", "history <image> now <image> go to the red box"), Turn("assistant", "↑")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory, chat_tokenizer, tiny_model_of) -> nn.Module:
    return tiny_model_of(request.param, tmp_path_factory.mktemp(request.param), chat_tokenizer).eval()


def test_the_protocol_lists_the_whole_surface():
    # A hand-written list: a member added to or dropped from the protocol must be added here too.
    assert PROTOCOL_METHODS == sorted([
        "prepare_frames", "tokens_per_frame", "vision_patches_per_frame", "encode_conversation",
        "encode_images", "encode_vision", "project", "embed", "position_ids", "packed_position_ids",
        "forward_lm", "output_embeddings", "part_of", "unreachable_trainable", "feature_producers",
        "feature_preprocess", "transformer_shapes", "save_final", "visual_grid"])


def test_members_and_signatures_match_the_protocol(model):
    assert isinstance(model, VLM) and isinstance(model, nn.Module)
    assert isinstance(model.family, str) and model.family
    assert isinstance(model.image_token_id, int) and isinstance(model.supports_split, bool)
    h, w = model.frame_size
    assert h > 0 and w > 0
    for name in PROTOCOL_METHODS:
        want = list(inspect.signature(getattr(VLM, name)).parameters)[1:]  # without self
        got = list(inspect.signature(getattr(model, name)).parameters)
        # same leading parameters, in order; extra ones only after them and optional
        assert got[:len(want)] == want, f"{model.family}.{name}{got} != protocol {want}"
        extra = list(inspect.signature(getattr(model, name)).parameters.values())[len(want):]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"{model.family}.{name}: {extra}"


def _frames(model, n: int) -> torch.Tensor:
    h, w = model.frame_size
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def _loss(model, enc, frames: FrameBatch) -> torch.Tensor:
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    mask = torch.ones_like(ids)
    embeds = model.embed(ids, model.encode_images(frames), torch.tensor([1, 0]), torch.tensor([1, 0]))
    return model.forward_lm(embeds, labels, attention_mask=mask, position_ids=model.position_ids(ids, mask))


def test_the_same_calls_give_the_same_kind_of_results(model):
    frames = model.prepare_frames(_frames(model, 2))
    assert isinstance(frames, FrameBatch) and frames.pixels.shape[0] == 2
    assert all(v.shape[0] == 2 for v in frames.meta.values())
    feats = model.encode_images(frames)
    k = model.tokens_per_frame(0)
    assert feats.ndim == 3 and feats.shape[:2] == (2, k)
    rows, cols = model.visual_grid()
    assert rows * cols == k and rows > 0 and cols > 0
    assert 0 < model.tokens_per_frame(1) <= k and model.vision_patches_per_frame() >= k

    enc = model.encode_conversation(CONVERSATION)
    assert enc.num_images == 2 and len(enc.input_ids) == len(enc.labels)
    assert enc.input_ids.count(model.image_token_id) == model.tokens_per_frame(1) + model.tokens_per_frame(0)
    labelled = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert labelled and model.image_token_id not in labelled

    calls = []
    handle = model.output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        loss = _loss(model, enc, frames)
    finally:
        handle.remove()
    assert loss.ndim == 0 and torch.isfinite(loss) and calls  # the LM head forward_lm uses

    if model.supports_split:
        torch.testing.assert_close(model.project(model.encode_vision(frames)), feats)
    else:
        with pytest.raises(NotImplementedError):
            model.encode_vision(frames)
    lm_shape, vision_shape = model.transformer_shapes()
    # visual tokens are LM-width (Qwen3-VL appends its deepstack levels, each LM-width too)
    assert feats.shape[-1] % lm_shape.hidden == 0 and lm_shape.vocab > 0
    assert vision_shape.vocab == 0 and vision_shape.patch_embed_params > 0
    assert model.feature_preprocess() and model.feature_producers(False)


def test_every_parameter_has_a_part(model):
    parts = {model.part_of(name) for name, _ in model.named_parameters()}
    assert parts == set(PARTS)
    assert set(model.unreachable_trainable()) <= {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError):
        model.part_of("no_such_module.weight")


def test_save_final_loads_back_with_the_same_loss(model, tmp_path):
    model.save_final(tmp_path / "final")
    again = load_final(tmp_path / "final", ModelConfig(family=model.family, frame_size=model.frame_size[0]))
    assert type(again) is type(model) and again.frame_size == model.frame_size and not again.training
    enc = model.encode_conversation(CONVERSATION)
    assert again.encode_conversation(CONVERSATION).input_ids == enc.input_ids
    frames = _frames(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(_loss(again, enc, again.prepare_frames(frames)),
                                   _loss(model, enc, model.prepare_frames(frames)), rtol=1e-5, atol=1e-6)
