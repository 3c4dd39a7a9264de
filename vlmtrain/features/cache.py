"""A frozen-encoder feature store: encode each unique frame once per (weights, preprocessing).

Layout of a cache directory::

    meta.json                   encoder fingerprint, preprocessing dict, store dtype, feature shape
    index.sqlite                entries(key -> shard, row), shards(id -> file, rows, bytes)
    shard-000000.safetensors    one tensor "features" (rows, K, D) in the store dtype; immutable

**Keys.** A feature's full identity is (encoder fingerprint, preprocessing, store dtype, frame
content). The first three are bound to the *directory* through ``meta.json`` and checked when the
cache is opened (``CacheMismatchError``), so the per-row key in the index is only the frame's content
hash (``frame_keys``: BLAKE2b of the uint8 pixels after the preprocessing resize). One directory
therefore holds features of exactly one producer; use one directory per encoder/preprocessing.

**Writes.** New rows collect in memory; when ``shard_size`` are pending (or on ``flush``/``close``) they
are written to a temporary file, fsynced, renamed onto ``shard-NNNNNN.safetensors`` (atomic on POSIX)
and only then indexed in one SQLite transaction. The index thus never names a shard that is not fully
on disk. A crash loses at most the pending rows (they are simply encoded again later); a shard renamed
but not yet indexed is adopted on the next open from the keys stored in its header; stale temp files
are removed. Shards are never rewritten, so open read handles stay valid. One writer per directory
(threads of one process share the object safely; other processes may open it with ``read_only=True``).

**Reads.** Each shard's data is memory-mapped once (``numpy.memmap`` at the offset the safetensors
header gives) and a lookup reads only the requested rows, with one indexed read per shard. Features come back as float32 holding values rounded
to the store dtype (bf16 by default): a cached feature equals the recomputed one cast to the store
dtype and back, not the raw fp32 output. ``vlmtrain.features.source`` rounds fresh misses the same way,
so a frame gets identical features whether it hit or missed.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmtrain.durable import fsync_dir
from vlmtrain.features.fingerprint import (
    FORMAT_VERSION, cache_enabled, canonical, fingerprint_modules, frame_keys, meta_differences,
)

__all__ = ["CacheMismatchError", "FeatureCache", "cache_enabled", "fingerprint_modules", "frame_keys",
           "STORE_DTYPES"]

STORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SHARD_RE = re.compile(r"^shard-(\d{6})\.safetensors$")
_TENSOR = "features"
_SQL_CHUNK = 900  # keys per IN (...) query; below SQLite's default host-parameter limit on old builds


class CacheMismatchError(RuntimeError):
    """The cache directory was built by different encoder weights, preprocessing or store dtype."""


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class FeatureCache:
    """Features of frozen-encoder frames in safetensors shards, indexed by frame key in SQLite.

    ``root``: cache directory (created). ``encoder_fingerprint``: ``fingerprint_modules(...)`` of the
    modules that produce the features. ``preprocess``: JSON-serialisable dict of everything that shapes
    the pixels before the encoder (frame size, normalisation, ...). ``dtype``: "bf16" or "fp16" store
    precision. ``shard_size``: rows per shard file. ``rebuild``: when the directory was built by a
    different producer, move it aside to ``<root>.stale-<time>`` (kept, for the user to delete) and
    start empty, instead of raising ``CacheMismatchError``. ``read_only``: never write or clean up
    (for processes beside the single writer).
    """

    def __init__(self, root: Union[str, Path], encoder_fingerprint: str, preprocess: dict, dtype: str = "bf16",
                 shard_size: int = 4096, rebuild: bool = False, read_only: bool = False):
        if dtype not in STORE_DTYPES:
            raise ValueError(f"feature cache dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.root = Path(root)
        self.dtype_name = dtype
        self.dtype = STORE_DTYPES[dtype]
        self.shard_size = shard_size
        self.read_only = read_only
        self._lock = threading.RLock()
        self._meta = {"format_version": FORMAT_VERSION, "encoder_fingerprint": encoder_fingerprint,
                      "preprocess": canonical(preprocess), "dtype": dtype, "feature_shape": None}
        self._open_meta(rebuild)
        self._db = self._connect()
        self._handles: dict[int, Any] = {}
        self._shard_files: dict[int, str] = {}
        self._pending_keys: list[str] = []
        self._pending_rows: list[torch.Tensor] = []  # (K, D) each, store dtype, CPU
        self._pending_index: dict[str, int] = {}
        self._hits = 0
        self._misses = 0
        if not read_only:
            self._recover()
        self._load_shard_table()

    # -- opening ---------------------------------------------------------------------------------
    def _open_meta(self, rebuild: bool) -> None:
        meta_path = self.root / "meta.json"
        if meta_path.exists():
            stored = json.loads(meta_path.read_text())
            problems = meta_differences(stored, self._meta)
            if problems and not rebuild:
                raise CacheMismatchError(
                    f"feature cache at {self.root} does not match this run: " + "; ".join(problems)
                    + ". Use a separate cache directory per encoder/preprocessing, or open with "
                    "rebuild=True to move the old cache aside and start empty.")
            if not problems:
                self._meta["feature_shape"] = stored.get("feature_shape")
                return
            if self.read_only:
                raise CacheMismatchError(f"feature cache at {self.root}: cannot rebuild a read-only cache")
            aside = self.root.with_name(f"{self.root.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.replace(self.root, aside)
        elif self.read_only:
            raise FileNotFoundError(f"no feature cache at {self.root} (meta.json missing)")
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(meta_path, self._meta)

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False: loader threads may call lookup; every use is under self._lock.
        if self.read_only:
            return sqlite3.connect(f"file:{self.root / 'index.sqlite'}?mode=ro", uri=True, check_same_thread=False)
        db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False)
        # WAL: readers in other processes never block the writer and see only committed shards.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, file TEXT NOT NULL, "
                   "rows INTEGER NOT NULL, bytes INTEGER NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, shard INTEGER NOT NULL, "
                   "row INTEGER NOT NULL) WITHOUT ROWID")
        db.commit()
        return db

    def _recover(self) -> None:
        """Drop temp files of interrupted writes; index shards renamed but not indexed before a crash."""
        for tmp in self.root.glob("*.tmp-*"):
            tmp.unlink(missing_ok=True)
        known = {row[0] for row in self._db.execute("SELECT file FROM shards")}
        for path in sorted(self.root.glob("shard-*.safetensors")):
            m = _SHARD_RE.match(path.name)
            if not m or path.name in known:
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = json.loads((f.metadata() or {})["keys"])
                    shape = f.get_slice(_TENSOR).get_shape()
                if len(keys) != shape[0]:
                    raise ValueError("key count does not match rows")
            except Exception:  # unreadable orphan: it was never indexed, so nothing refers to it
                path.unlink(missing_ok=True)
                continue
            self._index_shard(int(m.group(1)), path, keys)

    def _load_shard_table(self) -> None:
        with self._lock:
            rows = self._db.execute("SELECT id, file FROM shards").fetchall()
            self._shard_files = {sid: name for sid, name in rows}

    # -- reading ---------------------------------------------------------------------------------
    def lookup(self, keys: list[str], recount: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Which ``keys`` are cached and their features.

        Returns ``hits_mask`` (N,) bool and the features of the hits, in key order, as float32
        (H, K, D) on the CPU (H = hits_mask.sum(); (0, K, D), or (0, 0, 0) before any put, when none).
        Counts every key as a hit or a miss in ``stats``; ``recount``: the keys were all counted as
        misses by an earlier lookup (a batch prepared ahead looks its misses up again when its step
        runs), so a hit now moves from the misses to the hits and a miss is not counted again.
        """
        with self._lock:
            unique = set(keys)
            found: dict[str, tuple[int, int]] = {}  # key -> (shard, row); shard -1 = pending
            for k in unique:
                if k in self._pending_index:
                    found[k] = (-1, self._pending_index[k])
            found.update(self._indexed([k for k in unique if k not in found]))
            hit_rows = [i for i, k in enumerate(keys) if k in found]
            hits = torch.zeros(len(keys), dtype=torch.bool)
            hits[hit_rows] = True
            self._hits += len(hit_rows)
            self._misses += -len(hit_rows) if recount else len(keys) - len(hit_rows)
            if hit_rows:
                return hits, self._gather([found[keys[i]] for i in hit_rows]).float()
            shape = self._meta["feature_shape"] or [0, 0]
            return hits, torch.zeros((0, *shape), dtype=torch.float32)

    def _gather(self, locs: list[tuple[int, int]]) -> torch.Tensor:
        """Rows at (shard, row) locations, in order, in the store dtype: one indexed read per shard."""
        out = torch.empty((len(locs), *self._meta["feature_shape"]), dtype=self.dtype)
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        for i, (shard, row) in enumerate(locs):
            positions, rows = by_shard.setdefault(shard, ([], []))
            positions.append(i)
            rows.append(row)
        for shard, (positions, rows) in by_shard.items():
            if shard == -1:
                out[positions] = torch.stack([self._pending_rows[r] for r in rows])
            else:
                block = self._rows(shard)[np.asarray(rows)]  # fancy indexing copies only these rows
                out[positions] = torch.from_numpy(block).view(self.dtype)
        return out

    def _rows(self, shard: int) -> np.ndarray:
        """A shard's (rows, K, D) feature array, memory-mapped read-only as 16-bit words (bf16 and fp16
        have no NumPy type; the bytes are reinterpreted by ``_gather``). Shards are immutable once
        renamed into place, so a mapping never goes stale."""
        rows = self._handles.get(shard)
        if rows is None:
            if shard not in self._shard_files:  # indexed by another process after we opened
                self._load_shard_table()
            path = self.root / self._shard_files[shard]
            with open(path, "rb") as f:  # safetensors: u64 header size, JSON header, then the raw data
                header_size = int.from_bytes(f.read(8), "little")
                entry = json.loads(f.read(header_size))[_TENSOR]
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in ("BF16", "F16") or end - begin != 2 * int(np.prod(entry["shape"])):
                raise ValueError(f"{path}: unexpected feature tensor {entry}")
            rows = np.memmap(path, dtype=np.uint16, mode="r", offset=8 + header_size + begin,
                             shape=tuple(entry["shape"]))
            self._handles[shard] = rows
        return rows

    # -- writing ---------------------------------------------------------------------------------
    def put(self, keys: list[str], features: torch.Tensor) -> int:
        """Add features (N, K, D) for ``keys``; keys already stored (or repeated) are skipped.

        Rows are cast to the store dtype and kept in memory until a shard fills (then written) or
        ``flush``. Returns how many new rows were added. Thread-safe within one process.
        """
        if self.read_only:
            raise RuntimeError(f"feature cache at {self.root} was opened read-only")
        if features.dim() != 3 or features.shape[0] != len(keys):
            raise ValueError(f"put expects features (N, K, D) with N = {len(keys)} keys, got {tuple(features.shape)}")
        stored = features.detach().to("cpu", self.dtype)
        if self.dtype == torch.float16 and not torch.isfinite(stored).all() and torch.isfinite(features).all():
            raise ValueError("features overflow fp16 (|x| > 65504); use dtype='bf16'")
        with self._lock:
            self._check_shape(list(stored.shape[1:]))
            new = [i for i, k in enumerate(keys) if k not in self._pending_index]
            present = self._indexed([keys[i] for i in new])
            added = 0
            for i in new:
                k = keys[i]
                if k in present or k in self._pending_index:  # second test: repeats within this call
                    continue
                self._pending_index[k] = len(self._pending_keys)
                self._pending_keys.append(k)
                self._pending_rows.append(stored[i].clone())  # clone: do not pin the caller's whole batch
                added += 1
            while len(self._pending_keys) >= self.shard_size:
                self._write_shard(self.shard_size)
            return added

    def _check_shape(self, shape: list[int]) -> None:
        if self._meta["feature_shape"] is None:
            self._meta["feature_shape"] = shape
            _write_json_atomic(self.root / "meta.json", self._meta)
        elif self._meta["feature_shape"] != shape:
            raise ValueError(f"feature shape {shape} differs from the cache's {self._meta['feature_shape']}")

    def _indexed(self, keys: list[str]) -> dict[str, tuple[int, int]]:
        """(shard, row) of each of ``keys`` present in the index."""
        found = {}
        for i in range(0, len(keys), _SQL_CHUNK):
            chunk = keys[i:i + _SQL_CHUNK]
            query = f"SELECT key, shard, row FROM entries WHERE key IN ({','.join('?' * len(chunk))})"
            found.update((k, (shard, row)) for k, shard, row in self._db.execute(query, chunk))
        return found

    def flush(self) -> None:
        """Write every pending row to a (possibly short) shard and index it."""
        with self._lock:
            if self._pending_keys:
                self._write_shard(len(self._pending_keys))

    def _write_shard(self, n: int) -> None:
        """Write the first ``n`` pending rows as a new shard: temp file, fsync, rename, then index."""
        keys, rows = self._pending_keys[:n], self._pending_rows[:n]
        sid = 1 + (self._db.execute("SELECT COALESCE(MAX(id), -1) FROM shards").fetchone()[0])
        path = self.root / f"shard-{sid:06d}.safetensors"
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        # Keys ride in the header so a shard renamed just before a crash can be indexed on reopen.
        save_file({_TENSOR: torch.stack(rows)}, str(tmp), metadata={"keys": json.dumps(keys)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.root)
        self._index_shard(sid, path, keys)
        self._shard_files[sid] = path.name
        self._pending_keys = self._pending_keys[n:]
        self._pending_rows = self._pending_rows[n:]
        self._pending_index = {k: i for i, k in enumerate(self._pending_keys)}

    def _index_shard(self, sid: int, path: Path, keys: list[str]) -> None:
        # One transaction: the shard and all its entries appear together or not at all. OR IGNORE keeps
        # the first copy of a key if an adopted orphan repeats one already indexed.
        with self._db:
            self._db.execute("INSERT INTO shards (id, file, rows, bytes) VALUES (?, ?, ?, ?)",
                             (sid, path.name, len(keys), path.stat().st_size))
            self._db.executemany("INSERT OR IGNORE INTO entries (key, shard, row) VALUES (?, ?, ?)",
                                 [(k, sid, r) for r, k in enumerate(keys)])

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, float]:
        """``hits``/``misses`` counted by this object's lookups, ``hit_rate`` (0 before any lookup),
        ``entries`` (indexed + pending rows) and ``bytes`` (shard files on disk)."""
        with self._lock:
            size = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM shards").fetchone()[0]
            entries = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            total = self._hits + self._misses
            return {"hits": self._hits, "misses": self._misses, "hit_rate": self._hits / total if total else 0.0,
                    "entries": entries + len(self._pending_keys), "bytes": int(size)}

    @property
    def feature_shape(self) -> Optional[tuple[int, int]]:
        """(K, D) of the stored features, None before the first put."""
        shape = self._meta["feature_shape"]
        return tuple(shape) if shape else None

    def close(self) -> None:
        """Flush pending rows, then release shard handles and the index."""
        with self._lock:
            if not self.read_only:
                self.flush()
            self._handles.clear()
            self._db.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

