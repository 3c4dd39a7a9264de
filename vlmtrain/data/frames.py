"""Frames decoded once: every unique frame file is read, resized and kept as uint8 in one tensor.

Decision samples of an episode share almost all their frames, so decoding per sample would read each
JPEG up to ~9 times per epoch; here it is read once per run, by a few processes at start-up.
"""

from __future__ import annotations

import os
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vlmtrain.data.errors import DataError


def load_frame(path: str | Path, size: int) -> np.ndarray:
    """Decode one image file to RGB uint8 (size, size, 3), bilinear resize; errors name the file."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(str(path), "unreadable_image", detail=str(e)) from None


def resize_array(frame_HWC: np.ndarray, size: int) -> np.ndarray:
    """Resize an in-memory RGB frame exactly as :func:`load_frame` resizes a file."""
    if frame_HWC.shape[0] == size and frame_HWC.shape[1] == size:
        return frame_HWC
    return np.asarray(Image.fromarray(frame_HWC).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _load_chunk(args: tuple[list[str], int]) -> np.ndarray:
    paths, size = args
    return np.stack([load_frame(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)


def decode_frames(paths: Sequence[str | Path], size: int, workers: int = 2) -> torch.Tensor:
    """Decode ``paths`` into a uint8 tensor (N, 3, size, size) in the same order."""
    paths = [str(p) for p in paths]
    if workers <= 1 or len(paths) < 2000:
        arr = _load_chunk((paths, size))
    else:
        step = (len(paths) + workers * 4 - 1) // (workers * 4)
        chunks = [(paths[i : i + step], size) for i in range(0, len(paths), step)]
        with get_context("fork").Pool(workers) as pool:
            arr = np.concatenate(pool.map(_load_chunk, chunks))
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def readable(path: str | Path) -> bool:
    """Whether ``path`` opens as an image (header only: the check a lazily decoded store makes at start)."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


# Leading bytes of the image formats PIL decodes that data sets use; anything else goes through PIL.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def looks_like_image(path: str | Path) -> bool:
    """Whether ``path`` starts like an image file (JPEG, PNG, GIF, BMP, TIFF, WebP signatures; other
    files are opened by PIL): one 16-byte read, the check a sample index makes of every frame. A
    file whose body is corrupt passes and fails when it is decoded, with a message naming it."""
    try:  # os-level calls: a buffered file object costs more than the read itself
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.read(fd, 16)
        finally:
            os.close(fd)
    except OSError:
        return False
    if head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return True
    return bool(head) and readable(path)


class LazyFrames:
    """Frames decoded on demand: ``frames[idx]`` reads, resizes and stacks the files at ``idx``.

    Stands in for the (N, 3, S, S) uint8 tensor of :func:`decode_frames` when ``data.workers > 0``:
    loader worker processes then decode each step's unique frames themselves, so start-up does not
    decode the whole dataset and the main process never touches a JPEG.
    """

    def __init__(self, paths: Sequence[str | Path], size: int):
        # A path table (``dataset.FramePaths``, memory-mapped) is kept as it is; a list becomes strings.
        self.paths = paths if hasattr(paths, "path_of") else [str(p) for p in paths]
        self.size = size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, 3, size, size), as the decoded tensor would have."""
        return (len(self.paths), 3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx) -> torch.Tensor:
        rows = torch.as_tensor(idx).reshape(-1).tolist()
        arr = _load_chunk(([self.paths[i] for i in rows], self.size))
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
