"""The composed model's tokenizer and minimal chat format.

The tokenizer is a small BPE trained with the ``tokenizers`` library on the run's own conversation
text and saved with the model. Its chat format is one marker token per turn::

    <|system|> text   <|user|> text with <image> slots   <|assistant|> answer <eos>

Labels cover each assistant answer and its ``<eos>``. A dataset whose answers form a small closed
set (navigation actions ``STOP ↑ ← →``) gets each answer as one special token, so an answer is one
logit and cannot be split by the BPE merges.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmtrain.models.protocol import IGNORE_INDEX, IMAGE_PLACEHOLDER, Encoded, Turn

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
IMAGE = IMAGE_PLACEHOLDER
MARKERS = {"user": "<|user|>", "assistant": "<|assistant|>", "system": "<|system|>"}
BASE_SPECIALS = (PAD, UNK, BOS, EOS, IMAGE, MARKERS["user"], MARKERS["assistant"])
MAX_ANSWER_TOKENS = 64  # at most this many distinct answers become single tokens (a closed answer set)
ANSWER_TOKEN_MAX_CHARS = 16  # ... each at most this long


def closed_answers(conversations: Iterable[Sequence[Turn]]) -> list[str]:
    """The distinct assistant answers when they form a small closed set (each short, at most
    ``MAX_ANSWER_TOKENS`` of them), in first-seen order; else []."""
    seen: dict[str, None] = {}
    for turns in conversations:
        for turn in turns:
            if turn.role == "assistant":
                text = turn.text.strip()
                if len(text) > ANSWER_TOKEN_MAX_CHARS or IMAGE in text:
                    return []
                seen.setdefault(text, None)
                if len(seen) > MAX_ANSWER_TOKENS:
                    return []
    return list(seen)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384, answers: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer (Metaspace pre-tokenisation, lower-case) on ``texts``; ``answers`` become
    single special tokens after the chat markers."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = [*BASE_SPECIALS, MARKERS["system"], *[a for a in answers if a not in BASE_SPECIALS]]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, specials)


def tokenizer_from_conversations(conversations: Iterable[Sequence[Turn]], vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer trained on the distinct turn texts of ``conversations`` (read once; image
    placeholders removed: they are special tokens), with a closed answer set as single tokens."""
    turns = [t for conversation in conversations for t in conversation]
    texts = sorted({t.text.replace(IMAGE, " ") for t in turns})
    return train_tokenizer(texts, vocab_size, closed_answers([turns]))


def _wrap(tok: Tokenizer, specials: Sequence[str]) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS, additional_special_tokens=list(specials[4:]))


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """Save in the HF layout (``tokenizer.json`` + config) so transformers can load it too."""
    tok.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer`."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json in {directory}")
    tok = Tokenizer.from_file(str(path))
    return _wrap(tok, [t.content for _, t in sorted(tok.get_added_tokens_decoder().items())])


class ChatFormat:
    """Conversations -> token ids and labels in the composed model's chat format.

    ``tokens_for_image(age)`` is how many image-token ids a slot of that age takes (the last image
    of a conversation has age 0). Texts are tokenised once each (a run repeats few distinct prompts).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, tokens_for_image: Callable[[int], int]):
        self.tok = tokenizer
        self.tokens_for_image = tokens_for_image
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self.eos_id = tokenizer.convert_tokens_to_ids(EOS)
        self.marker_ids = {role: tokenizer.convert_tokens_to_ids(m) for role, m in MARKERS.items()}
        unk = tokenizer.convert_tokens_to_ids(UNK)
        missing = [MARKERS[r] for r, i in self.marker_ids.items() if i == unk and r != "system"]
        if missing or self.image_id == unk:
            raise ValueError(f"composed chat format: the tokenizer lacks {missing or [IMAGE]}")
        self._ids = lru_cache(maxsize=65536)(self._text_ids)

    def _text_ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"]) if text else ()

    def __call__(self, turns: Sequence[Turn]) -> Encoded:
        """Token ids and labels of ``turns`` (ValueError for an unknown role or an image in an answer)."""
        total = sum(t.text.count(IMAGE) for t in turns)
        ids: list[int] = []
        labels: list[int] = []
        seen = 0
        for turn in turns:
            if turn.role not in MARKERS:
                raise ValueError(f"unknown role {turn.role!r}; expected one of {sorted(MARKERS)}")
            text_ids = self._ids(turn.text)
            if turn.role == "assistant":
                if self.image_id in text_ids:
                    raise ValueError("an <image> in an assistant answer")
                answer = [*text_ids, self.eos_id]
                ids += [self.marker_ids["assistant"], *answer]
                labels += [IGNORE_INDEX, *answer]
                continue
            ids.append(self.marker_ids[turn.role])
            for i in text_ids:
                if i == self.image_id:
                    seen += 1
                    ids.extend([i] * self.tokens_for_image(total - seen))
                else:
                    ids.append(i)
            labels += [IGNORE_INDEX] * (len(ids) - len(labels))
        return Encoded(ids, labels, seen)
