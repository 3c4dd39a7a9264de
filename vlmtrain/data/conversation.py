"""The generic sample every conversation-style reader yields, and the checks shared by all of them.

A `ConvSample` is a chat (system / user / assistant turns) whose text marks each image with one
literal ``<image>`` placeholder, plus the image files in placeholder order. LLaVA / Qwen JSON,
InternVL meta files and InternVLA-N1 navigation scenes all become this one type, so tokenisation,
packing and the loader never need to know where a sample came from.

`validate_sample` and `check_length` never drop anything silently: every failure is a `DataError`
handed to the run's `ErrorPolicy` (raise, or skip and count by reason).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from os import PathLike

from PIL import Image

from vlmtrain.data.errors import DataError, ErrorPolicy

__all__ = [
    "IMAGE_PLACEHOLDER",
    "ROLES",
    "ConvSample",
    "ImageRef",
    "check_length",
    "count_placeholders",
    "validate_sample",
]

IMAGE_PLACEHOLDER = "<image>"
ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class ImageRef:
    """One image of a sample.

    Attributes:
        path: absolute path of the image file.
    """

    path: str


@dataclass(frozen=True)
class ConvSample:
    """One training conversation.

    Attributes:
        source: name of the dataset it came from (mixture key, metrics label).
        record: where it came from inside that dataset, for error messages: ``"line 3"`` (JSONL),
            ``"item 3"`` (JSON list), ``"episode 2 t=5"`` (navigation episodes).
        turns: ``(role, text)`` pairs, role in ``{"system", "user", "assistant"}``; the text holds
            one literal ``<image>`` per image.
        images: the images, in placeholder order.
    """

    source: str
    record: str
    turns: tuple[tuple[str, str], ...]
    images: tuple[ImageRef, ...] = ()


def count_placeholders(turns: tuple[tuple[str, str], ...]) -> int:
    """Number of ``<image>`` placeholders over all turns."""
    return sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)


def validate_sample(
    sample: ConvSample,
    path: str | PathLike[str],
    policy: ErrorPolicy,
    check_files: bool = True,
    verify_images: bool = False,
) -> bool:
    """Check one sample; hand the first defect found to `policy`.

    Checks, in order: every role is known (``bad_record``); the number of ``<image>`` placeholders
    equals the number of images (``image_count_mismatch``); there is at least one assistant turn
    (``no_answer``); with `check_files`, every image file exists (``missing_image``); with
    `verify_images`, PIL can parse it (``unreadable_image``, via ``Image.open(...).verify()``, which
    reads the headers and checksums without decoding pixels).

    Only the first defect is reported so a skipped sample is counted once, under one reason.

    Args:
        sample: the sample to check.
        path: the file to blame in the error (the annotation file, the dataset root).
        policy: raise, or skip and count.
        check_files: check that image files exist (one ``stat`` per image).
        verify_images: also open every image with PIL (slow on large corpora: opt-in).

    Returns:
        True when the sample is good; False when it was skipped.

    Raises:
        DataError: in raise mode, on the first defect.
    """
    err = _first_defect(sample, path, check_files, verify_images)
    if err is None:
        return True
    policy.handle(err)
    return False


def _first_defect(
    sample: ConvSample, path: str | PathLike[str], check_files: bool, verify_images: bool
) -> DataError | None:
    """The first `DataError` of `sample`, or None."""
    rec = sample.record
    for i, (role, text) in enumerate(sample.turns):
        if role not in ROLES:
            return DataError(path, "bad_record", rec, f"turn {i}: unknown role {role!r}")
        if not isinstance(text, str):
            return DataError(path, "bad_record", rec, f"turn {i}: text is not a string")
    n_placeholders = count_placeholders(sample.turns)
    if n_placeholders != len(sample.images):
        return DataError(
            path,
            "image_count_mismatch",
            rec,
            f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"but {len(sample.images)} image(s)",
        )
    if not any(role == "assistant" for role, _ in sample.turns):
        return DataError(path, "no_answer", rec, "no assistant turn to learn from")
    if check_files or verify_images:
        for image in sample.images:
            if not os.path.isfile(image.path):
                return DataError(path, "missing_image", rec, f"image not found: {image.path}")
    if verify_images:
        for image in sample.images:
            try:
                with Image.open(image.path) as im:
                    im.verify()
            except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
                return DataError(
                    path, "unreadable_image", rec, f"PIL cannot read {image.path}: {exc}"
                )
    return None


def check_length(
    sample_len: int,
    max_length: int,
    path: str | PathLike[str],
    record: str | int | None,
    policy: ErrorPolicy,
) -> bool:
    """Report a tokenised sample longer than `max_length` (reason ``too_long``).

    Truncation would cut the answer (the only supervised part) or an image's token block, so an
    over-long sample is an error or a counted skip, never silently shortened.

    Returns:
        True when the sample fits; False when it was skipped.

    Raises:
        DataError: in raise mode, when it does not fit.
    """
    if sample_len <= max_length:
        return True
    policy.handle(
        DataError(path, "too_long", record, f"{sample_len} tokens > max_length {max_length}")
    )
    return False
