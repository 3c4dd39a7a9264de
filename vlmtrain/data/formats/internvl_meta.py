"""Reader for InternVL meta files: named sources, each a LLaVA-style JSONL with a repeat factor.

::

    {"sharegpt4v": {"root": "data/images/", "annotation": "data/sharegpt4v.jsonl",
                    "repeat_time": 0.5, "data_augment": false, "length": 102025}, ...}

Each source is read with `read_llava_json` (image paths relative to ``root``). ``repeat_time``
becomes the source's mixture weight: `MetaSource.percent` is ``repeat_time * 100``, which
``vlmtrain.data.sources`` multiplies by the configured source's percent before `plan_mixture`
applies it (``< 1`` down-samples without replacement, ``> 1`` repeats whole copies and draws the
fractional part by seeded sampling). Relative ``root`` / ``annotation`` paths are resolved
against `base_dir` (default: the meta file's folder). See ``docs/data_formats.md``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from vlmtrain.data.conversation import ConvSample
from vlmtrain.data.errors import DataError, ErrorPolicy
from vlmtrain.data.formats.llava_json import read_llava_json

__all__ = ["MetaSource", "read_internvl_meta"]


@dataclass(frozen=True)
class MetaSource:
    """One entry of an InternVL meta file, with its samples.

    Attributes:
        name: the entry's key (used as the samples' ``source``).
        root: image root, absolute.
        annotation: annotation file, absolute.
        repeat_time: mixture weight (1.0 keeps every sample once).
        data_augment: the entry's ``data_augment`` flag, passed through for the image pipeline.
        length: the entry's declared ``length`` if any; informative only, never enforced.
        samples: the good samples of the annotation file.
    """

    name: str
    root: Path
    annotation: Path
    repeat_time: float
    data_augment: bool
    length: int | None
    samples: tuple[ConvSample, ...]

    @property
    def percent(self) -> float:
        """`repeat_time` as a mixture percent."""
        return self.repeat_time * 100.0


def read_internvl_meta(
    path: str | PathLike[str],
    policy: ErrorPolicy | None = None,
    base_dir: str | PathLike[str] | None = None,
    check_files: bool = True,
    verify_images: bool = False,
) -> list[MetaSource]:
    """Read an InternVL meta JSON and every annotation file it names.

    Args:
        path: the meta JSON file.
        policy: what to do with bad entries and records; default raises the first `DataError`.
        base_dir: folder relative ``root``/``annotation`` paths are joined to; default the meta
            file's folder.
        check_files: check that image files exist.
        verify_images: also open every image with PIL.

    Returns:
        One `MetaSource` per good entry, in file order.

    Raises:
        DataError: in raise mode: ``missing_file``, ``bad_json``, ``bad_meta`` (the file or an
            entry has the wrong shape), or any error of `read_llava_json`.
    """
    path = Path(path)
    policy = policy if policy is not None else ErrorPolicy("raise")
    base = Path(base_dir) if base_dir is not None else path.parent
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        policy.handle(DataError(path, "missing_file", detail="meta file not found"))
        return []
    except json.JSONDecodeError as exc:
        policy.handle(DataError(path, "bad_json", f"line {exc.lineno}", f"invalid JSON: {exc.msg}"))
        return []
    if not isinstance(meta, dict):
        policy.handle(DataError(path, "bad_meta", detail="expected an object of named sources"))
        return []
    sources: list[MetaSource] = []
    for name, entry in meta.items():
        try:
            root, annotation, repeat, augment, length = _parse_entry(path, name, entry, base)
        except DataError as err:
            policy.handle(err)
            continue
        samples = read_llava_json(
            annotation, root, policy, source=name, check_files=check_files,
            verify_images=verify_images,
        )
        sources.append(
            MetaSource(name, root, annotation, repeat, augment, length, tuple(samples))
        )
    return sources


def _parse_entry(
    path: Path, name: str, entry: Any, base: Path
) -> tuple[Path, Path, float, bool, int | None]:
    """Validate one meta entry; relative paths are joined to `base`."""
    record = f"source {name!r}"
    if not isinstance(entry, dict):
        raise DataError(path, "bad_meta", record, "entry must be an object")
    root, annotation = entry.get("root"), entry.get("annotation")
    if not isinstance(root, str) or not isinstance(annotation, str) or not annotation:
        raise DataError(path, "bad_meta", record, "needs string 'root' and 'annotation'")
    repeat = entry.get("repeat_time", 1.0)
    if (
        isinstance(repeat, bool)
        or not isinstance(repeat, (int, float))
        or not math.isfinite(repeat)
        or repeat < 0
    ):
        raise DataError(
            path, "bad_meta", record, f"repeat_time must be a number >= 0, got {repeat!r}"
        )
    augment = entry.get("data_augment", False)
    if not isinstance(augment, bool):
        raise DataError(path, "bad_meta", record, f"data_augment must be a bool, got {augment!r}")
    length = entry.get("length")
    if length is not None and (
        isinstance(length, bool) or not isinstance(length, int) or length < 0
    ):
        raise DataError(path, "bad_meta", record, f"length must be an int >= 0, got {length!r}")
    # abspath, not resolve(): normalise ``..`` but keep symlinked folders as the user named them.
    return (
        Path(os.path.abspath(base / root)),
        Path(os.path.abspath(base / annotation)),
        float(repeat),
        augment,
        length,
    )

