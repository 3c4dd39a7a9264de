import pytest
import torch

from vlmtrain.config import RunConfig
from vlmtrain.models.composed import ComposedVLM, build_composed_vlm
from vlmtrain.models.projector import PixelShuffleProjector, pixel_shuffle


def test_pixel_shuffle_shapes_and_layout():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # 4x4 grid
    y = pixel_shuffle(x, 2)
    assert y.shape == (2, 4, 12)
    # the first output token holds patches (0,0),(0,1),(1,0),(1,1) of the grid
    assert torch.equal(y[0, 0], torch.cat([x[0, 0], x[0, 1], x[0, 4], x[0, 5]]))
    with pytest.raises(ValueError):
        pixel_shuffle(torch.zeros(1, 12, 3), 2)


def test_projector_shapes():
    p = PixelShuffleProjector(96, 128, shuffle=2)
    assert p(torch.randn(5, 16, 96)).shape == (5, 4, 128)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_save_reload_gives_identical_logits(arch, tmp_path):
    mcfg = RunConfig().model
    mcfg.lm_arch = arch
    torch.manual_seed(0)
    m = build_composed_vlm(mcfg, 32, vocab_size=64, image_token_id=4, pad_token_id=0, max_frame_slots=9)
    torch.nn.init.normal_(m.frame_age.weight)  # non-trivial values must survive the round trip
    px = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    ids = torch.tensor([[1] + [4] * 8 + [5, 6, 7]])
    slots, ages = torch.tensor([2, 0]), torch.tensor([1, 0])
    mask = torch.ones_like(ids)

    def logits(model):
        model.eval()
        e = model.embed(ids, model.encode_images(px), slots, ages)
        return model.next_token_logits(e, mask, torch.tensor([ids.shape[1] - 1]))

    m.save_pretrained(tmp_path)
    again = ComposedVLM.from_pretrained(tmp_path)
    assert torch.equal(logits(m), logits(again))


def test_embed_rejects_slot_count_mismatch():
    m = build_composed_vlm(RunConfig().model, 32, 64, 4, 0, 9)
    feats = m.encode_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image-token positions"):
        m.embed(torch.tensor([[1, 4, 4, 2]]), feats, torch.tensor([0]))


def test_history_slots_are_pooled_current_slot_is_not():
    mcfg = RunConfig().model
    mcfg.history_tokens = 1
    m = build_composed_vlm(mcfg, 32, 64, 4, 0, 0)  # no frame-age embedding: compare raw features
    feats = torch.randn(3, 4, mcfg.lm_hidden)
    # sample: history frames 0 and 2 (1 token each), current frame 1 (4 tokens)
    ids = torch.tensor([[1, 4, 4, 4, 4, 4, 4, 2]])
    out = m.embed(ids, feats, torch.tensor([0, 2, 1]), torch.tensor([2, 1, 0]))
    assert torch.allclose(out[0, 1], feats[0].mean(0), atol=1e-6)
    assert torch.allclose(out[0, 2], feats[2].mean(0), atol=1e-6)
    assert torch.allclose(out[0, 3:7], feats[1])
    assert m.tokens_per_history_image(32) == 1 and m.tokens_per_image(32) == 4
