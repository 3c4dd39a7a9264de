"""The sample index: every configured source read, checked and tokenized once, kept on disk as flat
NumPy arrays and memory-mapped by every run and rank that uses the same inputs.

One index per configured source (``data.sources[i]``, or ``data.root``), in
``<index dir>/<name>-<key>/`` (``data.index_dir``, else ``$VLMTRAIN_INDEX_DIR``, else
``~/.cache/vlmtrain/index``). ``key`` fingerprints everything the samples depend on: the format,
paths, the annotation files found under them (path, size, mtime) and the folders' mtimes (a frame
added or removed changes its folder's), the reader options (``setting``, ``num_history``,
``prompt``), the source name (InternVLA-N1 reads its camera settings from it) and the model's chat
encoding (its tokenizer and the ids of a probe conversation). Not in it: the seed, ``%N``,
``max_length`` and ``on_error`` (applied when a run opens the index), so one index serves every
mixture and every error policy. A changed input makes a new key, hence a new build; an unchanged
one is opened in milliseconds. Built by :mod:`vlmtrain.data.index_build`.

**Layout** (``meta.json`` + one raw ``.bin`` per column, dtypes in ``meta.json``)::

    per sample  seq, frame_start, num_frames, episode, step, source, record_offsets
    per seq     seq_start, seq_len, seq_labels (labelled tokens after position 0), seq_bad
    tokens      tokens, labels                 (int32, every unique sequence end to end)
    per slot    sample_frames                  (int32 frame ids, frame_start .. + num_frames)
    per frame   frame_ok, path_offsets + paths (utf-8 blob)
    records     record_offsets + records       (utf-8 labels: "scene/episode 3 t=5", "line 7")

``meta.json`` also holds the mixture sources (an InternVL meta file holds several), the defects in
reading order (a raise-mode run raises the first, a skip-mode run counts them all) and the counts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmtrain.data.conversation import IMAGE_PLACEHOLDER
from vlmtrain.models.protocol import VLM, Turn

__all__ = ["COLUMNS", "INDEX_VERSION", "META", "OFFSET_COLUMNS", "IndexSpec", "SourceIndex", "default_index_root",
           "encoding_fingerprint", "index_key"]

log = logging.getLogger(__name__)
INDEX_VERSION = 1
META = "meta.json"
# Files whose content never changes a sample's text (frames): not stat-ed by the fingerprint walk.
IMAGE_SUFFIXES = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"})
# (file, dtype) of every column.
COLUMNS = {
    "seq": "int32", "frame_start": "int64", "num_frames": "int32", "episode": "int32", "step": "int32",
    "source": "int32", "record_offsets": "int64", "records": "uint8",
    "seq_start": "int64", "seq_len": "int32", "seq_labels": "int32", "seq_bad": "uint8",
    "tokens": "int32", "labels": "int32", "sample_frames": "int32",
    "frame_ok": "uint8", "path_offsets": "int64", "paths": "uint8",
}
OFFSET_COLUMNS = ("record_offsets", "path_offsets")  # start with a leading 0


@dataclass(frozen=True)
class IndexSpec:
    """One configured source as the index sees it (what its samples depend on, except the model)."""

    fmt: str
    name: str
    path: str
    image_root: str = ""
    setting: str = "125cm_0deg"
    num_history: int = 8
    prompt: str = ""
    n1: str = ""  # internvla_n1: its N1Rules as JSON (formats/internvla_n1_reference.py)


def default_index_root(configured: str = "") -> Path:
    """``data.index_dir``, else ``$VLMTRAIN_INDEX_DIR``, else ``~/.cache/vlmtrain/index``."""
    if configured:
        return Path(configured)
    env = os.environ.get("VLMTRAIN_INDEX_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vlmtrain" / "index"


# -- fingerprint ----------------------------------------------------------------------------------
def _walk_stats(path: Path, out: list, exclude: str = "") -> None:
    """(path, size, mtime_ns) of ``path`` or, for a folder, of every non-image file and every folder
    under it (folder mtimes change when frames are added or removed; frames themselves are not
    stat-ed: one stat per frame would cost more than the rest of a warm start)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        out.append((str(path), -1, -1))
        return
    out.append((str(path), st.st_size if not path.is_dir() else 0, st.st_mtime_ns))
    if not path.is_dir():
        return
    stack = [str(path)]
    found: list = []
    while stack:
        folder = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    if e.path != exclude:  # an index folder kept inside the data is not an input
                        found.append((e.path, 0, e.stat(follow_symlinks=False).st_mtime_ns))
                        stack.append(e.path)
                elif e.name.rpartition(".")[2].lower() not in IMAGE_SUFFIXES:
                    st = e.stat()
                    found.append((e.path, st.st_size, st.st_mtime_ns))
    out.extend(sorted(found))  # listing order is the file system's: sorted, the key is not


def _input_files(spec: IndexSpec, exclude: str = "") -> list:
    """The file statistics the fingerprint covers for ``spec`` (``exclude``: a folder not walked)."""
    path = Path(os.path.abspath(spec.path))
    stats: list = []
    _walk_stats(path, stats, exclude)
    if spec.fmt == "internvl_meta" and path.is_file():  # the annotation files the meta file names
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        for entry in meta.values() if isinstance(meta, dict) else ():
            if isinstance(entry, dict) and isinstance(entry.get("annotation"), str):
                _walk_stats(Path(os.path.abspath(path.parent / entry["annotation"])), stats)
    return stats


def encoding_fingerprint(model: VLM) -> str:
    """A digest of how ``model`` turns a conversation into tokens: its class, tokenizer, frame size
    and the ids and labels of a probe conversation with images (catches a changed chat format)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__qualname__.encode())
    tok = model.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(repr((tuple(model.frame_size), model.tokens_per_frame(), int(model.image_token_id))).encode())
    probe = [Turn("system", "You navigate."), Turn("user", f"a {IMAGE_PLACEHOLDER} b {IMAGE_PLACEHOLDER} walk."),
             Turn("assistant", "↑ STOP")]
    enc = model.encode_conversation(probe)
    h.update(np.asarray(enc.input_ids, dtype=np.int64).tobytes() + np.asarray(enc.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("vlmtrain")
    except Exception:  # a source checkout that is not installed
        return "unknown"


def index_key(spec: IndexSpec, model_fingerprint: str, exclude: str = "") -> str:
    """The index's key: a blake2b digest of the version, ``spec``, its input files (``exclude``: the
    index folder, when it lives inside the data) and the model's encoding fingerprint."""
    h = hashlib.blake2b(digest_size=8)
    payload = {"version": INDEX_VERSION, "package": _package_version(), "spec": spec.__dict__,
               "abs": os.path.abspath(spec.path), "files": _input_files(spec, exclude), "model": model_fingerprint}
    h.update(json.dumps(payload, sort_keys=True).encode())
    return h.hexdigest()

# -- reading an index -----------------------------------------------------------------------------
class SourceIndex:
    """One built index, memory-mapped (columns are mapped on first use; nothing is copied)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        if self.meta.get("version") != INDEX_VERSION:
            raise ValueError(f"{self.folder}: index version {self.meta.get('version')} != {INDEX_VERSION}")
        self._cols: dict[str, np.ndarray] = {}

    def __getattr__(self, name: str) -> np.ndarray:
        if name.startswith("_") or name not in COLUMNS:
            raise AttributeError(name)
        col = self._cols.get(name)
        if col is None:
            n = int(self.meta["counts"][name])
            col = (np.memmap(self.folder / f"{name}.bin", dtype=COLUMNS[name], mode="r", shape=(n,))
                   if n else np.zeros(0, dtype=COLUMNS[name]))
            self._cols[name] = col
        return col

    def __getstate__(self) -> dict:  # pickled by path: a worker maps the files itself
        return {"folder": self.folder, "meta": self.meta}

    def __setstate__(self, state: dict) -> None:
        self.folder, self.meta, self._cols = state["folder"], state["meta"], {}

    @property
    def n_samples(self) -> int:
        """Samples in the index."""
        return int(self.meta["samples"])

    @property
    def n_frames(self) -> int:
        """Frame files in the index."""
        return int(self.meta["frames"])

    def record(self, i: int) -> str:
        """The record label of sample ``i`` (``"scene/episode 3 t=5"``, ``"line 7"``)."""
        a, b = int(self.record_offsets[i]), int(self.record_offsets[i + 1])
        return bytes(self.records[a:b]).decode("utf-8")

    def path(self, f: int) -> str:
        """The file of frame ``f``."""
        a, b = int(self.path_offsets[f]), int(self.path_offsets[f + 1])
        return bytes(self.paths[a:b]).decode("utf-8")
