import numpy as np
import torch

from vlmtrain.data.loader import EpochPlan, collate
from vlmtrain.data.samples import TokenizedSample
from vlmtrain.models.protocol import IGNORE_INDEX


def _sample(n_tokens, frames, image_id=9):
    ids = [1] + [image_id] * len(frames) + [2] * (n_tokens - len(frames) - 1)
    labels = [IGNORE_INDEX] * (n_tokens - 1) + [2]
    return TokenizedSample(ids, labels, tuple(frames))


def test_collate_dedupes_frames_and_maps_slots():
    frames = torch.arange(10 * 3 * 2 * 2, dtype=torch.uint8).reshape(10, 3, 2, 2)
    batch = collate([_sample(6, [3, 5, 7]), _sample(8, [5, 7])], frames, pad_id=0, image_id=9)
    assert batch.pixels.shape[0] == 3  # frames 3, 5, 7 once each
    assert batch.num_slots == 5 and batch.num_visual_tokens == 5
    # every slot points at the right frame
    wanted = torch.stack([frames[i] for i in [3, 5, 7, 5, 7]])
    assert torch.equal(batch.pixels[batch.slot_frames], wanted)
    assert batch.slot_age.tolist() == [2, 1, 0, 1, 0]
    assert batch.input_ids.shape == (2, 8)
    assert batch.attention_mask.sum().item() == 14 == batch.num_tokens
    assert batch.labels[0, 6:].eq(IGNORE_INDEX).all()  # padding carries no labels
    assert batch.num_label_tokens == 2


def test_plan_is_pure_function_of_seed_and_step():
    a, b = EpochPlan(100, 8, seed=3), EpochPlan(100, 8, seed=3)
    seq = [a.batch_indices(k).tolist() for k in range(30)]
    # seeking straight to a later step gives the same batch as walking there (no replay needed)
    assert b.batch_indices(29).tolist() == seq[29]
    assert b.batch_indices(5).tolist() == seq[5]
    # one epoch is 12 batches of distinct samples
    first_epoch = np.concatenate(seq[:12])
    assert len(set(first_epoch.tolist())) == 96
    assert seq[12] != seq[0]  # a new epoch has a new order
    assert EpochPlan(100, 8, seed=4).batch_indices(0).tolist() != seq[0]
