"""The one data path (data/dataset.py) with the composed model: sources read without a model, samples
tokenized in the model's chat format, frames decoded once, too-long samples never cut."""

from pathlib import Path

import pytest

from vlmtrain.data.errors import DataError
from vlmtrain.train.build import build_model_and_data


def test_gridnav_samples_in_the_composed_chat_format(tiny_cfg):
    model, data = build_model_and_data(tiny_cfg, Path(tiny_cfg.output_dir))
    tok = model.tokenizer
    # 24 episodes, every frame shown as some decision's current frame: one sample per frame
    assert len(data.samples) == int(data.frames.shape[0]) > 24
    assert (data.pad_id, data.image_id) == (tok.pad_token_id, tok.convert_tokens_to_ids("<image>"))
    first = data.samples[0]  # episode 0, t=0: no history, the current frame only
    assert first.frames == (0,)
    assert first.input_ids[0] == tok.convert_tokens_to_ids("<|user|>")
    assert first.input_ids.count(data.image_id) == model.tokens_per_frame(0) == 4
    labelled = [i for i, lab in zip(first.input_ids, first.labels) if lab != -100]
    assert tok.convert_ids_to_tokens(labelled)[-1] == "<eos>" and len(labelled) == 2
    assert tok.convert_ids_to_tokens(labelled)[0] in {"STOP", "↑", "←", "→"}
    later = data.samples[5]  # t=5 of episode 0: 1 pooled history frame (1 token) + the current
    assert later.frames == (0, 5) and later.input_ids.count(data.image_id) == 1 + 4


def test_a_sample_over_max_length_is_an_error_naming_its_record_or_a_counted_skip(tiny_cfg):
    _, data = build_model_and_data(tiny_cfg, Path(tiny_cfg.output_dir))
    lengths = sorted(len(s.input_ids) for s in data.samples)
    limit = lengths[len(lengths) // 2]
    assert lengths[-1] > limit
    tiny_cfg.data.max_length = limit
    with pytest.raises(DataError, match=rf"episode \d+ t=\d+: too_long: \d+ tokens > max_length {limit}"):
        build_model_and_data(tiny_cfg, Path(tiny_cfg.output_dir))
    tiny_cfg.data.on_error = "skip"
    _, kept = build_model_and_data(tiny_cfg, Path(tiny_cfg.output_dir))
    too_long = sum(n > limit for n in lengths)
    assert kept.skipped == {"too_long": too_long} and len(kept.samples) == len(lengths) - too_long
    assert max(len(s.input_ids) for s in kept.samples) <= limit
