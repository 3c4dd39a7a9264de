import numpy as np
import pytest

from vlmtrain.data.samples import IGNORE_INDEX, SampleTokenizer, VLNSample, history_indices, template_texts
from vlmtrain.data.tokenizer import ACTION_TOKENS, action_token_ids, load_tokenizer, save_tokenizer, train_tokenizer


@pytest.mark.parametrize("t", [1, 2, 5, 8, 9, 30, 100])
def test_history_indices_match_internvla_rule(t):
    expected = np.unique(np.linspace(0, t - 1, 8).astype(int)).tolist()
    got = history_indices(t, 8)
    assert got == expected
    assert got[0] == 0 and got[-1] == t - 1 and len(got) == min(t, 8)


def test_no_history_at_first_frame():
    assert history_indices(0) == []


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(template_texts(["walk to the red box and stop", "go to the blue box"]), 200)


def test_actions_are_single_tokens_and_tokenizer_round_trips(tok, tmp_path):
    ids = action_token_ids(tok)
    assert len(set(ids)) == 4
    for a, i in zip(ACTION_TOKENS, ids):
        assert tok(a, add_special_tokens=False)["input_ids"] == [i]
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    text = "walk to the red box and stop"
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_labels_only_on_answer_and_slots_expand(tok):
    stok = SampleTokenizer(tok, tokens_per_image=4, max_length=256)
    s = VLNSample(episode=0, t=3, instruction="walk to the red box and stop", frames=(10, 11, 12, 13), target=2)
    ts = stok(s)
    assert len(ts.input_ids) == len(ts.labels)
    assert ts.input_ids.count(stok.image_id) == 4 * 4
    labelled = [(i, l) for i, l in zip(ts.input_ids, ts.labels) if l != IGNORE_INDEX]
    assert labelled == [(stok.action_ids[2], stok.action_ids[2]), (stok.eos_id, stok.eos_id)]
    # the answer follows the assistant marker directly
    k = ts.labels.index(stok.action_ids[2])
    assert ts.input_ids[k - 1] == stok.assistant_id


def test_too_long_sample_is_an_error_not_a_cut(tok):
    stok = SampleTokenizer(tok, tokens_per_image=16, max_length=40)
    s = VLNSample(0, 8, "go to the blue box", tuple(range(9)), 1)
    with pytest.raises(ValueError, match="max_length"):
        stok(s)
