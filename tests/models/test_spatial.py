"""The spatial branch (models/spatial.py) on every family: at weight 0 it changes nothing (loss and
gradients of the model without it), at weight 0.2 only its projector learns and its frozen encoder
gets no gradient; the saved model reloads with the same loss; an encoder other than the trained one
is refused; its FLOPs are the hand-counted ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from vlmtrain.config import ModelConfig
from vlmtrain.metrics.flops import model_flops
from vlmtrain.models.composed import build_composed_vlm
from vlmtrain.models.parts import trained_parts
from vlmtrain.models.protocol import Turn
from vlmtrain.models.registry import load_final, load_spatial_model
from vlmtrain.models.spatial import SpatialConfigError, SpatialSettings, SpatialVLM, attach_spatial, load_branch
from vlmtrain.models.tiny_spatial import save_tiny_dinov2

FAMILIES = ["composed", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "llava"]
CONVERSATION = [Turn("user", "history <image> now <image> go to the red box"), Turn("assistant", "↑")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dinov2", seed=0)


@pytest.fixture(scope="module", params=FAMILIES)
def base(request, tmp_path_factory, chat_tokenizer, tiny_model_of) -> nn.Module:
    return tiny_model_of(request.param, tmp_path_factory.mktemp(request.param), chat_tokenizer)


def _pixels(model, n: int = 2) -> torch.Tensor:
    h, w = model.frame_size
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def _loss(model, pixels: torch.Tensor) -> torch.Tensor:
    enc = model.encode_conversation(CONVERSATION)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    mask = torch.ones_like(ids)
    feats = model.encode_images(model.prepare_frames(pixels))
    embeds = model.embed(ids, feats, torch.tensor([1, 0]), torch.tensor([1, 0]))
    return model.forward_lm(embeds, labels, attention_mask=mask, position_ids=model.position_ids(ids, mask))


def _grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_weight_zero_changes_nothing_and_only_the_projector_learns(base, dino):
    base.eval()  # no dropout: the two forwards must see the same computation
    pixels = _pixels(base)
    plain_loss = _loss(base, pixels)
    plain = _grads(base, plain_loss)

    zero = attach_spatial(base, SpatialSettings(str(dino), weight=0.0)).eval()
    assert isinstance(zero, SpatialVLM) and zero.base is base
    zero_loss = _loss(zero, pixels)
    fused = _grads(zero, zero_loss)
    torch.testing.assert_close(zero_loss, plain_loss, rtol=0, atol=1e-6)
    assert set(plain) == {n[len("base."):] for n in fused if n.startswith("base.")}
    for name, g in plain.items():
        torch.testing.assert_close(fused[f"base.{name}"], g, rtol=0, atol=1e-6)

    on = attach_spatial(base, SpatialSettings(str(dino), weight=0.2)).eval()
    on_loss = _loss(on, pixels)
    grads = _grads(on, on_loss)
    assert abs(float(on_loss.detach()) - float(plain_loss.detach())) > 1e-6  # the branch is really fused in
    projector = [n for n, _ in on.named_parameters() if n.startswith("spatial.projector.")]
    encoder = [n for n, _ in on.named_parameters() if n.startswith("spatial.encoder.")]
    assert projector and encoder
    assert all(n in grads and grads[n].abs().sum() > 0 for n in projector)
    assert not any(n in grads for n in encoder)
    assert {on.part_of(n) for n in projector + encoder} == {"spatial"}
    assert trained_parts(on)[0] - trained_parts(base)[0] == {"spatial"}


def test_saved_model_reloads_with_the_same_loss_and_refuses_another_encoder(base, dino, tmp_path):
    model = attach_spatial(base, SpatialSettings(str(dino), weight=0.2)).eval()
    with torch.no_grad():
        for p in model.spatial.projector.parameters():
            p.add_(0.05)  # trained-looking weights, not the initial ones
    pixels = _pixels(model)
    want = _loss(model, pixels).detach()
    model.save_final(tmp_path / "final")
    for again in (load_final(tmp_path / "final", ModelConfig(family=base.family, frame_size=base.frame_size[0])),
                  load_spatial_model(tmp_path / "final", frame_size=base.frame_size[0])):
        assert isinstance(again, SpatialVLM) and not again.training
        torch.testing.assert_close(_loss(again, pixels), want, rtol=0, atol=1e-6)

    other = save_tiny_dinov2(tmp_path / "other_dino", seed=1)
    with pytest.raises(SpatialConfigError, match="not the one this model was trained with"):
        load_branch(base, tmp_path / "final", encoder_path=other)


def test_spatial_flops_are_the_hand_counted_ones(dino, chat_tokenizer):
    torch.manual_seed(0)
    mcfg = ModelConfig(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64, lm_hidden=32,
                       lm_layers=1, lm_heads=2, lm_kv_heads=2, lm_intermediate=64)
    plain = build_composed_vlm(mcfg, 32, chat_tokenizer, max_frame_slots=3)
    fused = attach_spatial(plain, SpatialSettings(str(dino), projector="mlp"))
    trained, lora = trained_parts(fused)
    with_branch = model_flops(fused, trained, lora)
    without = model_flops(plain, *trained_parts(plain))
    args = ([20, 12], 3, 3, 5)
    # tiny DINOv2: hidden 32, 2 layers, 2 heads of 16, MLP 64, patch 8 on a 32 px input = 16 patches.
    # body = patch embedding 3*8*8*32 + 2 layers x (4*32*32 + 2*32*64) = 6144 + 16384 = 22528
    # encoder per frame = 2 x 22528 x 16 (frozen dense) + 2 layers x 4 x 16 x 2 x 16^2 (attention once)
    encoder_per_frame = 2 * 22528 * 16 + 2 * 4 * 16 * 2 * 16 * 16
    # projector (mlp 32->32->32: 2048 weights) trains (6N) on the 2x2 = 4 tokens of each of 3 unique frames
    projector = 6 * 2048 * 4 * 3
    assert with_branch.step(*args, spatial_encoded=3) - without.step(*args) == 3 * encoder_per_frame + projector
    assert with_branch.step(*args, spatial_encoded=0) - without.step(*args) == projector  # all cached


def test_bad_settings_are_one_line_errors(base, dino, tmp_path):
    with pytest.raises(SpatialConfigError, match="spatial_fusion=concat: the .* projector's input width is fixed"):
        attach_spatial(base, SpatialSettings(str(dino), fusion="concat"))  # no family here was built for it
    with pytest.raises(FileNotFoundError, match="model.spatial_encoder=.*not a directory"):
        attach_spatial(base, SpatialSettings(str(tmp_path / "missing")))
    vggt = tmp_path / "vggt"
    vggt.mkdir()
    (vggt / "config.json").write_text('{"model_type": "vggt"}')
    with pytest.raises(SpatialConfigError, match="VGGT has no transformers AutoModel"):
        attach_spatial(base, SpatialSettings(str(vggt)))
    assert dataclasses.asdict(SpatialSettings("x"))["weight"] == 0.2  # JanusVLN's weight by default


def test_concat_joins_the_vision_features_before_the_composed_projector(dino, chat_tokenizer, tmp_path):
    """concat (the composed model built for it): the projector reads vision_hidden more channels, the
    spatial projector and the model's projector learn, the frozen encoder does not, and the saved
    model reloads with the same loss."""
    torch.manual_seed(0)
    mcfg = ModelConfig(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64, lm_hidden=32,
                       lm_layers=1, lm_heads=2, lm_kv_heads=2, lm_intermediate=64, history_tokens=1,
                       spatial_encoder=str(dino), spatial_fusion="concat")
    base = build_composed_vlm(mcfg, 32, chat_tokenizer, max_frame_slots=3)
    assert base.projector.in_dim == 64 and base.spatial_concat_width == 32
    model = attach_spatial(base, SpatialSettings(str(dino), fusion="concat")).eval()
    assert model.spatial.grid == base.patch_grid() == (4, 4)  # 32 px / patch 8, before the pixel shuffle
    pixels = _pixels(model)
    frames = model.prepare_frames(pixels)
    feats = model.encode_images(frames)
    assert feats.shape == (2, model.tokens_per_frame(0), 32)
    vision = base.encode_vision(frames)
    spatial = model.spatial.encode(frames.meta["spatial_pixels"])
    torch.testing.assert_close(feats, base.project(torch.cat([vision, model.spatial.projector(spatial)], -1)))
    loss = _loss(model, pixels)
    grads = _grads(model, loss)
    assert all(grads[n].abs().sum() > 0 for n, _ in model.named_parameters() if n.startswith("spatial.projector."))
    assert not any(n.startswith("spatial.encoder.") for n in grads)
    # after the 2x2 pixel shuffle each of the 4 merged positions holds [32 vision | 32 spatial] channels
    first = grads["base.projector.mlp.0.weight"].reshape(32, 4, 64)
    assert first[:, :, 32:].abs().sum() > 0 and first[:, :, :32].abs().sum() > 0

    model.save_final(tmp_path / "final")
    again = load_final(tmp_path / "final", ModelConfig())
    torch.testing.assert_close(_loss(again, pixels), loss.detach(), rtol=0, atol=1e-6)
