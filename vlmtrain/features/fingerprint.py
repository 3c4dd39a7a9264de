"""Identities for the feature cache: what produced a feature (encoder fingerprint), which frame it
belongs to (frame key), and whether caching is valid at all for a run (``cache_enabled``).

A cached feature is only correct while three things hold still: the frame's pixels, the weights of
every module between the pixels and the feature, and the preprocessing that turned an image into
those pixels. The frame key covers the first; ``fingerprint_modules`` the second; the preprocessing
dict stored in the cache's ``meta.json`` the third (see ``features/cache.py``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Optional

import torch
from torch import nn

from vlmtrain.models.fingerprint import DIGEST_SIZE, fingerprint_modules  # noqa: F401  (re-exported)

# 20-byte BLAKE2b digests: 160 bits keep accidental collisions out of reach for any frame count a
# run will see, while the hex keys (40 chars) stay short in the SQLite index. BLAKE2b is in hashlib,
# faster than SHA-1/SHA-256 in CPython and releases the GIL on large buffers.

# Version of the on-disk cache layout (meta.json, index, shards); bump when it changes.
FORMAT_VERSION = 1

# Parts a model is split into for freezing, learning rates and LoRA (``models/lora.py`` PARTS).
VISION, PROJECTOR = "vision", "projector"


def frame_keys(pixels: torch.Tensor) -> list[str]:
    """One content key per frame of ``pixels`` (N, ...): a BLAKE2b digest of the row's bytes.

    The intended input is the uint8 frame *after* the preprocessing resize (what ``data/loader.py``
    puts in ``Batch.pixels``), so the key is cheap (no decoding, one hash per frame) and independent
    of where the image came from: the same view loaded from two files shares one entry. The row's
    dtype and shape are hashed too, so equal bytes of a different frame size never collide. Float
    pixels (an HF adapter's ``FrameBatch.pixels``) work as well: they are keyed by their exact bytes.
    """
    if pixels.dim() < 2:
        raise ValueError(f"frame_keys expects (N, ...) frames, got shape {tuple(pixels.shape)}")
    if pixels.shape[0] == 0:  # a batch without frames (text-only samples)
        return []
    rows = pixels.detach().to("cpu").contiguous()
    header = f"{rows.dtype} {tuple(rows.shape[1:])}\n".encode()
    flat = rows.reshape(rows.shape[0], -1).view(torch.uint8).numpy()
    keys = []
    for row in flat:
        h = hashlib.blake2b(header, digest_size=DIGEST_SIZE)
        h.update(memoryview(row))
        keys.append(h.hexdigest())
    return keys


def cache_enabled(
    trainable_parts: Iterable[str],
    lora_parts: Optional[Iterable[str]] = (),
    producer_parts: Iterable[str] = (VISION, PROJECTOR),
) -> tuple[bool, str]:
    """Whether a frozen-feature cache is valid for a run, and why (a line for the run log).

    ``trainable_parts``: model parts whose weights the optimizer updates (any of "vision",
    "projector", "llm"); ``lora_parts``: parts that carry trainable LoRA layers (None or empty for
    none); ``producer_parts``: the parts whose output is cached and fingerprinted (the composed model's
    ``encode_images`` runs vision *and* projector). Caching is off as soon as any producer part
    changes during training, because every step would make the stored features stale; the cache then
    switches itself off and the reason says which part and how to get it back.
    """
    trainable = set(trainable_parts)
    lora = set(lora_parts or ())
    producers = list(producer_parts)
    for part in producers:
        if part in lora:
            return False, (f"feature cache off: the {part} part has LoRA layers that train, so its "
                           f"features change every step (drop '{part}' from model.lora_parts to cache)")
        if part in trainable:
            hint = (" (a model whose projector can be split from its encoder caches vision-only features "
                    "while the projector trains; this one cannot)" if part == PROJECTOR and VISION in producers
                    else "")
            return False, (f"feature cache off: the {part} part trains, so its features change every "
                           f"step (set train.freeze_{part}=true to cache{hint})")
    return True, f"feature cache on: {' + '.join(producers)} frozen, features keyed by encoder fingerprint"


def canonical(value: Any) -> Any:
    """JSON round trip: tuples become lists and key order stops mattering, so equal dicts compare equal."""
    return json.loads(json.dumps(value, sort_keys=True))


def meta_differences(stored: dict, current: dict) -> list[str]:
    """What differs between a cache's stored ``meta.json`` and this run's, one readable line each
    (empty when the cache fits). Fields: format_version, encoder_fingerprint, preprocess, dtype."""
    out = []
    if stored.get("format_version") != current["format_version"]:
        out.append(f"format version differs (stored {stored.get('format_version')}, now {current['format_version']})")
    if stored.get("encoder_fingerprint") != current["encoder_fingerprint"]:
        out.append(f"encoder fingerprint differs (stored {str(stored.get('encoder_fingerprint'))[:12]}…, "
                   f"now {current['encoder_fingerprint'][:12]}…): the encoder/projector weights changed")
    old, new = stored.get("preprocess") or {}, canonical(current["preprocess"])
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        details = ", ".join(f"{k}: stored {old.get(k)!r}, now {new.get(k)!r}" for k in changed)
        out.append(f"preprocessing parameters differ ({details})")
    if stored.get("dtype") != current["dtype"]:
        out.append(f"store dtype differs (stored {stored.get('dtype')}, now {current['dtype']})")
    return out
