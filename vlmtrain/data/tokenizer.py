"""A small tokenizer trained on the data's own text with the `tokenizers` library, saved with the run.

Action symbols and the chat/image markers are single tokens, so an action's score is one logit and
an image slot is one id that ``embed`` replaces by visual features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
IMAGE = "<image>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
ACTION_TOKENS = ("STOP", "↑", "←", "→")  # index = action id (0 STOP, 1 forward, 2 left, 3 right)
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE, USER, ASSISTANT, *ACTION_TOKENS]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer (Metaspace pre-tokenisation, lower-case) on ``texts``."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=[IMAGE, USER, ASSISTANT, *ACTION_TOKENS],
    )
    return fast


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """Save in the HF layout (``tokenizer.json`` + config) so transformers can load it too."""
    tok.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer`."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json in {directory}")
    return _wrap(Tokenizer.from_file(str(path)))


def action_token_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    """Token ids of STOP, forward, left, right (in action-id order)."""
    return [tok.convert_tokens_to_ids(t) for t in ACTION_TOKENS]
