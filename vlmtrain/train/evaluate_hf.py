"""Closed-loop GridNav evaluation of an HF-family run (Qwen2/2.5/3-VL, Idefics3/SmolVLM, LLaVA).

The run's ``model/`` directory (the merged HF checkpoint ``save_final_model`` writes) is loaded behind
its adapter and driven by :class:`HFPolicy`, a batched policy over the simulator's episode states.

**Decoding: candidate scoring.** An HF model answers in its own chat format with an action *text*
(``STOP``, ``↑``, ``←``, ``→``), which its tokenizer may split into several tokens (the arrows are
multi-byte), followed by the family's end-of-answer token. Instead of sampling or greedy generation
(which can produce text that is no action and needs a parser), every state is scored against all
four complete answers and the policy takes the most likely one:

    score(a) = log P(action_text(a) + end-of-answer | prompt, frames)

summed over exactly the positions training labels (``encode_conversation``'s labels), so the score
is the log-probability of the whole training target. Including the end token makes the four answers
comparable whatever their token counts (a candidate cannot win by being a prefix of another), and
the sum (not the mean) is the answer's probability, not a length-normalised proxy. Ties go to the
lowest action id (STOP first), as ``argmax`` breaks them.

The log-probabilities come from the adapter's own ``forward_lm`` (so Qwen MRoPE position ids and
Qwen3-VL deepstack run exactly as in training): a forward hook on the output embedding (``lm_head``)
captures the logits that ``forward_lm`` computes at the labelled positions only, and
:func:`answer_log_likelihood` turns them into per-sample sums. The loss ``forward_lm`` returns is
checked against the captured logits, so an adapter that stopped computing logits that way fails loudly
instead of scoring garbage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from vlmtrain.config import RunConfig
from vlmtrain.data.frames import resize_array
from vlmtrain.data.gridnav.simulate import EpisodeState
from vlmtrain.data.samples import action_text, history_indices, user_prompt
from vlmtrain.data.tokenizer import ACTION_TOKENS
from vlmtrain.models.hf_base import IGNORE_INDEX, Encoded, FrameBatch, HFVLMAdapter, Turn
from vlmtrain.models.registry import load_adapter

log = logging.getLogger("vlmtrain")

# States scored per LM forward; each state is len(ACTION_TOKENS) = 4 rows (one per candidate answer).
DEFAULT_STATES_PER_FORWARD = 32


def conversation(instruction: str, num_history_frames: int, action: int, prompt: str) -> list[Turn]:
    """The two-turn conversation training used for a decision (``sources.vln_conversations``): the
    ``prompt`` user turn with one ``<image>`` per frame, then the action text as the answer."""
    return [Turn("user", user_prompt(instruction, num_history_frames, prompt)), Turn("assistant", action_text(action))]


@torch.no_grad()
def answer_log_likelihood(adapter: HFVLMAdapter, inputs_embeds: torch.Tensor, labels: torch.Tensor,
                          attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-sample summed log-probability of the labelled tokens, shape (B,) (0 for a row without labels).

    Takes the same inputs as ``adapter.forward_lm`` (unshifted labels, IGNORE_INDEX elsewhere) and runs
    it once; a forward hook on the HF model's output embedding captures the logits it computes at the
    positions whose next token is labelled (row-major, i.e. the order of ``labels[:, 1:] != -100``).
    """
    targets_BL = labels[:, 1:].to(inputs_embeds.device)
    keep_BL = targets_BL != IGNORE_INDEX
    captured: list[torch.Tensor] = []
    head = adapter.hf.get_output_embeddings()
    handle = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        mean_loss = adapter.forward_lm(inputs_embeds, labels, attention_mask=attention_mask,
                                       position_ids=position_ids)
    finally:
        handle.remove()
    num_labels = int(keep_BL.sum())
    sums_B = torch.zeros(labels.shape[0], dtype=torch.float32, device=inputs_embeds.device)
    if num_labels == 0:
        return sums_B
    logits_TV = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).float() if captured else None
    if logits_TV is None or logits_TV.shape[0] != num_labels:
        got = 0 if logits_TV is None else logits_TV.shape[0]
        raise RuntimeError(f"{adapter.family}: forward_lm computed logits at {got} positions, expected the "
                           f"{num_labels} labelled ones; answer_log_likelihood relies on that")
    logp_T = torch.log_softmax(logits_TV, dim=-1).gather(1, targets_BL[keep_BL].unsqueeze(1)).squeeze(1)
    # Guard: the captured logits must be the ones forward_lm's own loss came from.
    if not torch.allclose(-logp_T.mean(), mean_loss.float(), rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"{adapter.family}: captured logits give loss {float(-logp_T.mean()):.6f} but "
                           f"forward_lm returned {float(mean_loss):.6f}")
    rows_T = keep_BL.nonzero(as_tuple=True)[0]
    return sums_B.index_add_(0, rows_T, logp_T)


def pad_token_id(adapter: HFVLMAdapter) -> int:
    """An id to right-pad rows with: pad, else eos, else 0 (never the image token, which ``embed``
    counts); its value is irrelevant otherwise because padding is masked and unlabelled."""
    tok = adapter.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0, 1):
        if candidate is not None and candidate != adapter.image_token_id:
            return int(candidate)
    raise AssertionError("unreachable: 0 and 1 cannot both be the image token")


class HFPolicy:
    """An HF-family VLM as a batched GridNav policy that picks actions by candidate scoring.

    Each call scores the live states in chunks of ``batch_size`` states (x 4 candidate answers per LM
    forward). A chunk's unique frames are resized to the adapter's frame size exactly as training
    decodes them (bilinear, ``data/frames.py``), go through ``adapter.prepare_frames`` and are encoded
    once; all four candidates of a state share those features. Features are not kept across calls:
    the history frames ``linspace(0, t-1, n)`` mostly change from one step to the next anyway.
    """

    def __init__(self, adapter: HFVLMAdapter, num_history: int, prompt: str, device: torch.device,
                 batch_size: int = DEFAULT_STATES_PER_FORWARD):
        height, width = adapter.frame_size
        if height != width:  # training decodes frames square (conv_data) and so does resize_array
            raise ValueError(f"{adapter.family}: frame size {adapter.frame_size} is not square")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.adapter, self.num_history, self.prompt = adapter, num_history, prompt
        self.device, self.batch_size, self.size = device, batch_size, height
        self.pad_id = pad_token_id(adapter)
        self._encoded: dict[tuple[str, int], list[Encoded]] = {}

    def candidates(self, instruction: str, num_history_frames: int) -> list[Encoded]:
        """The tokenised conversation of every action answer (cached per instruction and history length)."""
        key = (instruction, num_history_frames)
        if key not in self._encoded:
            encoded = [self.adapter.encode_conversation(conversation(instruction, num_history_frames, a, self.prompt))
                       for a in range(len(ACTION_TOKENS))]
            for e in encoded:
                if e.num_images != num_history_frames + 1:
                    raise ValueError(f"data.prompt={self.prompt!r} gives {e.num_images} image slots for "
                                     f"{num_history_frames + 1} frames")
            self._encoded[key] = encoded
        return self._encoded[key]

    @torch.no_grad()
    def scores(self, states: Sequence[EpisodeState]) -> torch.Tensor:
        """(S, 4) log-probability of each action answer for each state (column = action id), on CPU."""
        out = [self._score_chunk(states[i: i + self.batch_size]) for i in range(0, len(states), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, len(ACTION_TOKENS))

    def __call__(self, states: list[EpisodeState]) -> list[int]:
        """One action per live episode state: the highest-scoring candidate answer."""
        return self.scores(states).argmax(-1).tolist()

    def _score_chunk(self, states: Sequence[EpisodeState]) -> torch.Tensor:
        # Unique frames of the chunk, keyed by (episode, frame index), in first-use order.
        rows: dict[tuple[int, int], int] = {}
        images: list[np.ndarray] = []
        encoded: list[Encoded] = []
        slots: list[int] = []
        for s in states:
            t = len(s.frames) - 1
            shown = history_indices(t, self.num_history) + [t]
            state_slots = []
            for i in shown:
                key = (s.spec.index, i)
                if key not in rows:
                    rows[key] = len(images)
                    images.append(resize_array(s.frames[i], self.size))
                state_slots.append(rows[key])
            for e in self.candidates(s.spec.instruction, len(shown) - 1):
                encoded.append(e)
                slots.extend(state_slots)
        pixels_NCHW = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        frames: FrameBatch = self.adapter.prepare_frames(pixels_NCHW).to(self.device)
        ids, labels, mask = self._pad(encoded)
        slot_frames = torch.tensor(slots, dtype=torch.long, device=self.device)
        embeds = self.adapter.embed(ids, self.adapter.encode_images(frames), slot_frames)
        positions = self.adapter.position_ids(ids, mask, frames, slot_frames)
        ll = answer_log_likelihood(self.adapter, embeds, labels, mask, positions)
        return ll.view(len(states), len(ACTION_TOKENS)).cpu()

    def _pad(self, encoded: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, labels and attention mask on the device, as ``loader.collate`` pads."""
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        return ids.to(self.device), labels.to(self.device), mask.to(self.device)


def load_hf_run(run_dir: Path, cfg: RunConfig) -> HFVLMAdapter:
    """The run's final model (``run_dir/model``, merged HF checkpoint) behind its adapter, in eval mode.

    Frames are sized as in training: ``model.frame_size`` (0: the adapter's default)."""
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no final model to evaluate (no config.json; was training interrupted?). "
            f"Finish training (vlmtrain train with train.resume=true), or export the newest checkpoint "
            f"there: vlmtrain export {run_dir} --merged {model_dir}")
    adapter = load_adapter(cfg.model.family, model_dir, cfg.model.frame_size or None)
    return adapter.eval()


def hf_policy(run_dir: Path, cfg: RunConfig, device: torch.device,
              batch_size: int = DEFAULT_STATES_PER_FORWARD) -> HFPolicy:
    """The HF run's trained model on ``device`` as a GridNav policy (history and prompt from its config)."""
    adapter = load_hf_run(run_dir, cfg).to(device)
    log.info("eval: %s model from %s, frames %s, candidate scoring of %d actions, %d states per forward",
             adapter.family, run_dir / "model", adapter.frame_size, len(ACTION_TOKENS), batch_size)
    return HFPolicy(adapter, cfg.data.num_history, cfg.data.prompt, device, batch_size)
