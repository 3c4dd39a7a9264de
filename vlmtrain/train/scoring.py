"""Log-likelihood of labelled answers from a model's own ``forward_lm``: what closed-loop evaluators
(``evaluate.VLMPolicy``, ``evaluate_n1.PixelGoalPolicy``) and validation (``validate.py``) score with.

A forward hook on the output embedding (``output_embeddings()``) captures the logits ``forward_lm``
computes at the labelled positions only; :func:`labelled_log_probs` checks them against the loss it
returned, so a model that stopped computing logits that way fails loudly instead of scoring garbage.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from vlmtrain.models.protocol import IGNORE_INDEX, VLM, Encoded


@contextlib.contextmanager
def captured_logits(model: VLM) -> Iterator[list[torch.Tensor]]:
    """Within this context, every output of the model's output embedding (the logits ``forward_lm``
    computes, at the labelled positions only) is appended to the yielded list."""
    captured: list[torch.Tensor] = []
    handle = model.output_embeddings().register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def labelled_log_probs(model: VLM, captured: list[torch.Tensor], labels: torch.Tensor, mean_loss: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probability of each labelled target, whether it is the argmax, its row), each shape (T,),
    in row-major order of ``labels[:, 1:] != -100``, from the logits :func:`captured_logits` caught
    in one ``forward_lm`` that returned ``mean_loss``. Raises when they are not the logits that loss
    came from (a model that stopped computing logits that way fails loudly, not with garbage)."""
    targets_BL = labels[:, 1:].to(mean_loss.device)
    keep_BL = targets_BL != IGNORE_INDEX
    num_labels = int(keep_BL.sum())
    if num_labels == 0:
        empty = torch.zeros(0, device=mean_loss.device)
        return empty, empty.bool(), empty.long()
    logits_TV = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).float() if captured else None
    if logits_TV is None or logits_TV.shape[0] != num_labels:
        got = 0 if logits_TV is None else logits_TV.shape[0]
        raise RuntimeError(f"{model.family}: forward_lm computed logits at {got} positions, expected the "
                           f"{num_labels} labelled ones; scoring relies on that")
    targets_T = targets_BL[keep_BL]
    logp_T = torch.log_softmax(logits_TV, dim=-1).gather(1, targets_T.unsqueeze(1)).squeeze(1)
    if not torch.allclose(-logp_T.mean(), mean_loss.float(), rtol=1e-3, atol=1e-4):
        raise RuntimeError(f"{model.family}: captured logits give loss {float(-logp_T.mean()):.6f} but "
                           f"forward_lm returned {float(mean_loss):.6f}")
    return logp_T, logits_TV.argmax(-1) == targets_T, keep_BL.nonzero(as_tuple=True)[0]


@torch.no_grad()
def answer_log_likelihood(model: VLM, inputs_embeds: torch.Tensor, labels: torch.Tensor,
                          attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-sample summed log-probability of the labelled tokens, shape (B,) (0 for a row without labels).

    Takes the same inputs as ``model.forward_lm`` (unshifted labels, IGNORE_INDEX elsewhere) and runs
    it once, catching its logits (:func:`captured_logits`, :func:`labelled_log_probs`).
    """
    with captured_logits(model) as captured:
        mean_loss = model.forward_lm(inputs_embeds, labels, attention_mask=attention_mask, position_ids=position_ids)
    logp_T, _, rows_T = labelled_log_probs(model, captured, labels, mean_loss)
    sums_B = torch.zeros(labels.shape[0], dtype=torch.float32, device=inputs_embeds.device)
    return sums_B.index_add_(0, rows_T, logp_T) if len(rows_T) else sums_B


def pad_encoded(encoded: Sequence[Encoded], pad_id: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels and attention mask of ``encoded`` on ``device``, as ``loader.collate`` pads."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)
