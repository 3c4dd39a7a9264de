import pytest
import torch

from vlmtrain.config import RunConfig
from vlmtrain.models.composed import ComposedVLM, build_composed_vlm
from vlmtrain.models.composed_chat import closed_answers, load_tokenizer, save_tokenizer, tokenizer_from_conversations
from vlmtrain.models.protocol import IGNORE_INDEX, Turn
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
def test_save_final_reload_gives_identical_loss_and_tokenizer(arch, tmp_path, chat_tokenizer):
    mcfg = RunConfig().model
    mcfg.lm_arch = arch
    torch.manual_seed(0)
    m = build_composed_vlm(mcfg, 32, chat_tokenizer, max_frame_slots=9)
    torch.nn.init.normal_(m.frame_age.weight)  # non-trivial values must survive the round trip
    frames = m.prepare_frames(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    enc = m.encode_conversation([Turn("user", "<image><image> go to the red box"), Turn("assistant", "↑")])
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    slots, ages = torch.tensor([2, 0]), torch.tensor([1, 0])

    def loss(model):
        model.eval()
        e = model.embed(ids, model.encode_images(frames), slots, ages)
        return model.forward_lm(e, labels, attention_mask=torch.ones_like(ids))

    m.save_final(tmp_path)
    again = ComposedVLM.from_pretrained(tmp_path)
    assert torch.equal(loss(m), loss(again))
    assert again.encode_conversation([Turn("user", "find the blue chair")]).input_ids == \
        m.encode_conversation([Turn("user", "find the blue chair")]).input_ids


def test_embed_rejects_slot_count_mismatch(chat_tokenizer):
    m = build_composed_vlm(RunConfig().model, 32, chat_tokenizer, 9)
    feats = m.encode_images(m.prepare_frames(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)))
    img = m.image_token_id
    with pytest.raises(ValueError, match="image-token positions"):
        m.embed(torch.tensor([[1, img, img, 2]]), feats, torch.tensor([0]))


def test_history_slots_are_pooled_current_slot_is_not(chat_tokenizer):
    mcfg = RunConfig().model
    mcfg.history_tokens = 1
    m = build_composed_vlm(mcfg, 32, chat_tokenizer, 0)  # no frame-age embedding: compare raw features
    feats = torch.randn(3, 4, mcfg.lm_hidden)
    # sample: history frames 0 and 2 (1 token each), current frame 1 (4 tokens)
    img = m.image_token_id
    ids = torch.tensor([[1, img, img, img, img, img, img, 2]])
    out = m.embed(ids, feats, torch.tensor([0, 2, 1]), torch.tensor([2, 1, 0]))
    assert torch.allclose(out[0, 1], feats[0].mean(0), atol=1e-6)
    assert torch.allclose(out[0, 2], feats[2].mean(0), atol=1e-6)
    assert torch.allclose(out[0, 3:7], feats[1])
    # 32 px / patch 8 = 4x4 patches, pixel shuffle 2 -> 4 tokens for the current frame, 1 for history
    assert [m.tokens_per_frame(a) for a in (0, 1, 2)] == [4, 1, 1]


def test_chat_format_labels_the_answer_and_expands_slots_by_age(chat_tokenizer):
    mcfg = RunConfig().model
    mcfg.history_tokens = 1
    m = build_composed_vlm(mcfg, 32, chat_tokenizer, 3)
    tok = chat_tokenizer
    enc = m.encode_conversation([Turn("system", "find the blue chair"),
                                 Turn("user", "<image><image> now: <image> go to the red box."),
                                 Turn("assistant", "←")])
    assert enc.num_images == 3 and len(enc.input_ids) == len(enc.labels)
    img, eos = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<eos>")
    left = tok.convert_tokens_to_ids("←")
    assert left != tok.unk_token_id
    # two pooled history slots (1 token each) and the current frame (4 tokens)
    runs = "".join("I" if i == img else "." for i in enc.input_ids)
    assert runs.count("I") == 1 + 1 + 4 and "IIII" in runs
    ids = enc.input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|system|>")
    assert ids.count(tok.convert_tokens_to_ids("<|user|>")) == 1
    assert ids[-3:] == [tok.convert_tokens_to_ids("<|assistant|>"), left, eos]
    assert [(i, lab) for i, lab in zip(ids, enc.labels) if lab != IGNORE_INDEX] == [(left, left), (eos, eos)]
    with pytest.raises(ValueError, match="assistant answer"):
        m.encode_conversation([Turn("user", "x"), Turn("assistant", "<image>")])
    with pytest.raises(ValueError, match="unknown role"):
        m.encode_conversation([Turn("robot", "x")])


def test_tokenizer_from_conversations_makes_a_closed_answer_set_single_tokens(tmp_path):
    convs = [[Turn("user", "<image> go to the red box"), Turn("assistant", a)] for a in ("STOP", "↑", "←", "→")]
    tok = tokenizer_from_conversations(convs, vocab_size=80)
    for answer in ("STOP", "↑", "←", "→"):
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    assert again("go to the red box")["input_ids"] == tok("go to the red box")["input_ids"]
    assert again.convert_tokens_to_ids("↑") == tok.convert_tokens_to_ids("↑")
    # free-text answers are not a closed set: no answer tokens
    long = [[Turn("user", "q"), Turn("assistant", f"a long free answer number {i}")] for i in range(3)]
    assert closed_answers(long) == []
