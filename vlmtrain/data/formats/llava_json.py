"""Reader for LLaVA / Qwen-VL style conversation files (a JSON list, or JSONL).

Each record::

    {"id": "...", "image": "coco/1.jpg",            # or "image": [...], or "images": [...]
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt",   "value": "A cat."}]}

``from`` may be ``human``/``user``, ``gpt``/``assistant`` or ``system``; ``role``/``content`` are
accepted in place of ``from``/``value``. Image paths are relative to ``image_root`` unless
absolute. A record with images but no ``<image>`` placeholder anywhere gets one ``<image>\\n`` per
image prepended to its first human turn (the LLaVA convention). See ``docs/data_formats.md``.

The container is detected from the content, not the extension: a file whose first non-blank
character is ``[`` is one JSON list (records named ``item N``, 0-based); anything else is JSONL
(records named ``line N``, 1-based; blank lines are ignored). Every bad record is a `DataError`
handed to the `ErrorPolicy`.
"""

from __future__ import annotations

import json
import os
from os import PathLike
from pathlib import Path
from typing import Any, Iterator

from vlmtrain.data.conversation import (
    IMAGE_PLACEHOLDER,
    ConvSample,
    ImageRef,
    count_placeholders,
    validate_sample,
)
from vlmtrain.data.errors import DataError, ErrorPolicy

__all__ = ["ROLE_ALIASES", "parse_llava_record", "read_llava_json"]

# Every spelling of a speaker seen in LLaVA, ShareGPT, Qwen-VL and InternVL data.
ROLE_ALIASES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def read_llava_json(
    path: str | PathLike[str],
    image_root: str | PathLike[str],
    policy: ErrorPolicy | None = None,
    source: str | None = None,
    check_files: bool = True,
    verify_images: bool = False,
) -> list[ConvSample]:
    """Read a LLaVA / Qwen JSON or JSONL conversation file into `ConvSample`s.

    Args:
        path: the annotation file.
        image_root: folder that relative image paths are joined to.
        policy: what to do with a bad record; default raises the first `DataError`.
        source: dataset name stored on each sample; default the file's stem.
        check_files: check that every image file exists (``missing_image``).
        verify_images: also open every image with PIL (``unreadable_image``); slow, opt-in.

    Returns:
        The good samples, in file order.

    Raises:
        DataError: in raise mode, on the first bad record: ``missing_file``, ``bad_json``,
            ``bad_record`` (not an object, missing/ill-typed keys, unknown role),
            ``unsupported_record`` (video samples), ``image_count_mismatch``, ``no_answer``,
            ``missing_image``, ``unreadable_image``.
    """
    path = Path(path)
    policy = policy if policy is not None else ErrorPolicy("raise")
    source = source if source is not None else path.stem
    image_root = Path(image_root)
    samples: list[ConvSample] = []
    try:
        records = _open_records(path)
    except DataError as err:
        # The container itself is unreadable (missing file, or a JSON list that does not parse):
        # no record in it can be trusted, so the whole file is one error.
        policy.handle(err)
        return samples
    for record, obj in records:
        if isinstance(obj, DataError):
            policy.handle(obj)
            continue
        try:
            sample = parse_llava_record(obj, record, image_root, source, path)
        except DataError as err:
            policy.handle(err)
            continue
        if validate_sample(sample, path, policy, check_files, verify_images):
            samples.append(sample)
    return samples


def _open_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Records of the file as ``(record label, parsed object or DataError)``.

    Container-level failures (missing file, a JSON list that does not parse) raise here, before
    any record is yielded; a bad JSONL line becomes a `DataError` *value* instead, so in skip mode
    the lines after it are still read. JSONL is streamed, never held in memory whole.
    """
    try:
        with path.open(encoding="utf-8") as f:
            first = _first_non_blank_char(f)
            if first == "[":
                f.seek(0)
                try:
                    items = json.load(f)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        path, "bad_json", f"line {exc.lineno}", f"invalid JSON: {exc.msg}"
                    )
                return ((f"item {i}", obj) for i, obj in enumerate(items))
    except FileNotFoundError:
        raise DataError(path, "missing_file", detail="annotation file not found")
    return _jsonl_records(path)


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Stream ``(line N, object or DataError)`` over the non-blank lines of a JSONL file."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            record = f"line {lineno}"
            try:
                yield record, json.loads(line)
            except json.JSONDecodeError as exc:
                yield record, DataError(path, "bad_json", record, f"invalid JSON: {exc.msg}")


def _first_non_blank_char(f: Any) -> str:
    """First non-whitespace character of an open text file ('' when empty)."""
    while True:
        chunk = f.read(4096)
        if not chunk:
            return ""
        stripped = chunk.lstrip()
        if stripped:
            return stripped[0]


def parse_llava_record(
    obj: Any, record: str, image_root: Path, source: str, path: str | PathLike[str]
) -> ConvSample:
    """Turn one parsed LLaVA record into a `ConvSample` (not yet validated against the files).

    Raises:
        DataError: ``bad_record`` or ``unsupported_record`` when the record is malformed.
    """
    if not isinstance(obj, dict):
        raise DataError(
            path, "bad_record", record, f"expected a JSON object, got {type(obj).__name__}"
        )
    if "video" in obj:
        raise DataError(path, "unsupported_record", record, "video samples are not supported")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(path, "bad_record", record, "missing or empty 'conversations' list")

    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise DataError(path, "bad_record", record, f"conversations[{i}] is not an object")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(speaker, str) or not isinstance(text, str):
            raise DataError(
                path,
                "bad_record",
                record,
                f"conversations[{i}] needs string 'from' and 'value' (or 'role' and 'content')",
            )
        role = ROLE_ALIASES.get(speaker.lower())
        if role is None:
            raise DataError(
                path,
                "bad_record",
                record,
                f"conversations[{i}]: unknown role {speaker!r} "
                f"(expected one of {', '.join(sorted(ROLE_ALIASES))})",
            )
        turns.append((role, text))

    image_paths = _image_list(obj, record, path)
    images = tuple(ImageRef(_resolve(image_root, p)) for p in image_paths)
    if images and count_placeholders(tuple(turns)) == 0:
        # LLaVA convention: a single-image record may omit the placeholder; the image goes in
        # front of the first human turn. Several images are all put there, in list order.
        for i, (role, text) in enumerate(turns):
            if role == "user":
                turns[i] = (role, f"{IMAGE_PLACEHOLDER}\n" * len(images) + text)
                break
    return ConvSample(source=source, record=record, turns=tuple(turns), images=images)


def _image_list(obj: dict[str, Any], record: str, path: str | PathLike[str]) -> list[str]:
    """The record's image paths from ``image`` (str or list) or ``images`` (list)."""
    if "image" in obj and "images" in obj:
        raise DataError(path, "bad_record", record, "has both 'image' and 'images'")
    value = obj.get("image", obj.get("images"))
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise DataError(
            path, "bad_record", record, "'image'/'images' must be a path or a list of paths"
        )
    return values


def _resolve(image_root: Path, rel: str) -> str:
    """Absolute path of an image: `rel` joined to `image_root` unless already absolute."""
    return os.path.abspath(rel if os.path.isabs(rel) else os.path.join(image_root, rel))
