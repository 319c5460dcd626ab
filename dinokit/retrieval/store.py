"""The index store: SQLite (WAL) for items and settings, vector segments on disk, one writer at a time.

Folder layout (format version 2)::

    index.db             SQLite: meta (settings), items (id, path, metadata, deleted, segment, row),
                         fields (filterable metadata), segments (name, role, n, first_id, kind)
    write.lock           fcntl lock file: writers across processes take it in turn
    seg-<gen>-<uid>.npy  a small segment: float32 (n, D) unit vectors of ids first_id .. first_id+n-1
    main-<gen>-<uid>.npy the compacted vectors (float32 (n, D)), .ids.npy their ids (sorted), and
                         .faiss the approximate index over them (hnsw / ivfpq; flat has none),
                         .ivfdata its inverted lists when they live on disk (ivfpq ``ondisk=1``)

Why it loses nothing: a writer writes its segment file (fsynced, renamed into place) before it
commits the rows that name it, all in one transaction, and the database runs WAL with
``synchronous=FULL``. A process killed at any instant leaves either the old state (an orphan file
that no row names: removed by the next writer) or the new one. Readers read one WAL snapshot, so
they never see half a write; segment files are never modified, only replaced by a later commit.
An add writes O(new items) bytes: the new segment, its rows, and (amortized) merges of small
segments (each merge joins the two newest when the older is at most twice the newer, so there are
O(log n) small segments). ``compact`` folds everything into one main index: it claims the current
segments (a meta entry naming them and its pid: merges leave them alone, a dead claimant's claim is
ignored), builds the new index without holding the lock, then writes and swaps it in by one commit.

Filters: every item's top-level scalar metadata fields are also rows of ``fields`` (key, type,
value, id; primary key in that order), so an equality filter is an index lookup per key.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinokit._io import fsync_path
from dinokit._validate import one_line
from dinokit.retrieval.kinds import c_stdout_to_stderr, faiss
from dinokit.retrieval.metadata import field_rows, filter_query

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
DB_FILE = "index.db"
LOCK_FILE = "write.lock"
_SEGMENT_RE = re.compile(r"^(seg|main)-[0-9]+-[0-9a-f]+(\.ids)?\.(npy|faiss|ivfdata)$")
_SEGMENT_SUFFIXES = (".npy", ".ids.npy", ".faiss", ".ivfdata")
_MAX_SMALL_SEGMENTS = 24
_FILTER_CACHE = 32
_ITEM_MEMO = 200_000  # item rows remembered per snapshot for searches
_CLAIM_MAX_AGE = 6 * 3600  # a compaction claim older than this is stale even if its pid was reused

#: test hook: called with a stage name at the points where a crash must leave a consistent folder
#: ("segment-written", "before-commit", "committed", "compact-written", "compact-committed")
pause_hook: Callable[[str], None] | None = None

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, path TEXT, metadata TEXT NOT NULL DEFAULT '{}',
    deleted INTEGER NOT NULL DEFAULT 0, segment TEXT NOT NULL, row INTEGER NOT NULL, added REAL);
CREATE UNIQUE INDEX IF NOT EXISTS items_live_path ON items(path) WHERE deleted = 0 AND path IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_deleted ON items(deleted) WHERE deleted = 1;
CREATE TABLE IF NOT EXISTS fields (
    id INTEGER NOT NULL, key TEXT NOT NULL, t TEXT NOT NULL, value, PRIMARY KEY (key, t, value, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segments (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, n INTEGER NOT NULL, first_id INTEGER, kind TEXT NOT NULL);
"""


def _pause(stage: str) -> None:
    if pause_hook is not None:
        pause_hook(stage)


@dataclass(frozen=True)
class Segment:
    """Vectors of some items: ``ids`` int64 (n,) sorted, ``vectors`` float32 (n, D) (memory-mapped
    for a folder), ``index`` the FAISS index over them (main segment only)."""

    name: str
    role: str  # "main" | "small"
    kind: str
    ids: np.ndarray
    vectors: np.ndarray
    index: Any = None


@dataclass(frozen=True)
class Snapshot:
    """One committed state: segments, deleted ids still present in them (sorted), live count."""

    generation: int
    segments: tuple[Segment, ...]
    deleted: np.ndarray
    count: int
    meta: dict[str, Any] = field(default_factory=dict)
    # per-snapshot memo for searches (e.g. the live rows of each segment): built once, not per query
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ntotal(self) -> int:
        return sum(len(s.ids) for s in self.segments)

    @property
    def main(self) -> Segment | None:
        """The compacted main segment (None before the first compaction)."""
        return next((s for s in self.segments if s.role == "main"), None)


class Store:
    """SQLite + segment files of one index (a folder, or memory when ``folder`` is None)."""

    def __init__(self, folder: Path | None, conn: sqlite3.Connection, *, read_only: bool = False) -> None:
        self.folder = folder
        self.read_only = read_only
        self._conn = conn
        # one connection shared by threads: one statement at a time; a damaged database file is a
        # one-line ValueError naming it, wherever the damage is first read
        self._db = _GuardedLock(str(folder / DB_FILE) if folder is not None else ":memory:")
        self._writer = threading.Lock()  # threads of this process write in turn (flock is per fd)
        self._mem: dict[str, Any] = {}  # memory store: file name -> array / faiss index
        self._snap: Snapshot | None = None
        self._cache: dict[str, Segment] = {}
        self._filters: dict[tuple[str, int], np.ndarray] = {}  # (filter, generation) -> ids, oldest first

    # ------------------------------------------------------------------ open / create

    @classmethod
    def memory(cls, meta: dict[str, Any]) -> Store:
        """An empty store in memory with settings ``meta`` (dim, kind, knobs, model, feature, ...)."""
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        conn.executescript(_SCHEMA)
        store = cls(None, conn)
        store._init_meta(meta)
        return store

    @classmethod
    def create(cls, folder: Path, meta: dict[str, Any]) -> Store:
        """A new empty store in ``folder`` (created; must not hold an index already)."""
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / DB_FILE).exists():
            raise FileExistsError(f"{folder}: already holds an index")
        store = cls.open(folder, create=True)
        store._init_meta(meta)
        return store

    @classmethod
    def open(cls, folder: Path, *, read_only: bool = False, create: bool = False) -> Store:
        """Open the store in ``folder``; ValueError for a newer format or a corrupt database."""
        db = folder / DB_FILE
        if not create and not db.is_file():
            raise FileNotFoundError(f"{db}: missing (not a dinokit index folder?)")
        try:
            conn = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            conn.execute("PRAGMA busy_timeout=60000")
            if create:
                conn.executescript(_SCHEMA)
            store = cls(folder, conn, read_only=read_only)
            version = store.meta().get("format_version") if not create else FORMAT_VERSION
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{db}: not a readable index database ({one_line(str(e))})") from e
        if not isinstance(version, int) or version > FORMAT_VERSION:
            conn.close()
            raise ValueError(f"{db}: index format version {version!r} is not supported "
                             f"(this dinokit reads versions <= {FORMAT_VERSION})")
        return store

    def _init_meta(self, meta: dict[str, Any]) -> None:
        full = {"format_version": FORMAT_VERSION, "next_id": 0, "generation": 0, "count": 0, **meta}
        with self._db:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                   [(k, json.dumps(v)) for k, v in full.items()])
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._db:
            self._conn.close()

    # ------------------------------------------------------------------ reading

    def meta(self) -> dict[str, Any]:
        with self._db:
            return self._decode_meta(self._conn.execute("SELECT key, value FROM meta"))

    def _decode_meta(self, rows: Any) -> dict[str, Any]:
        """The meta table as a dict; a damaged value is a ValueError naming the database and the key."""
        out: dict[str, Any] = {}
        for key, value in rows:
            try:
                out[str(key)] = json.loads(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{self._where(DB_FILE)}: meta {key!r}: damaged value ({one_line(str(e))})") from e
        for key in ("dim", "generation", "count", "next_id"):
            if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 0):
                raise ValueError(f"{self._where(DB_FILE)}: meta {key!r}: expected a non-negative integer, "
                                 f"got {one_line(repr(out[key]), 60)}")
        return out

    def _json(self, value: Any, what: str) -> Any:
        try:
            return json.loads(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self._where(DB_FILE)}: {what}: damaged value ({one_line(str(e))})") from e

    def generation(self) -> int:
        with self._db:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(self._json(row[0], "meta 'generation'")) if row else 0

    def snapshot(self, *, refresh: bool = True) -> Snapshot:
        """The latest committed state (re-read only when another commit happened since)."""
        snap = self._snap
        if snap is not None and (not refresh or snap.generation == self.generation()):
            return snap
        for attempt in range(20):
            try:
                snap = self._read_snapshot()
                break
            except FileNotFoundError:
                # a compaction committed and removed the files between our read and our open: retry
                if attempt == 19:
                    raise
                time.sleep(0.05)
        assert snap is not None
        self._snap = snap
        return snap

    def _read_snapshot(self) -> Snapshot:
        with self._db:
            self._conn.execute("BEGIN")  # one WAL snapshot for every read below
            try:
                meta = self._decode_meta(self._conn.execute("SELECT key, value FROM meta"))
                rows = self._conn.execute("SELECT name, role, n, first_id, kind FROM segments").fetchall()
                deleted = np.array([r[0] for r in self._conn.execute(
                    "SELECT id FROM items WHERE deleted = 1 ORDER BY id")], dtype=np.int64)
                count = meta.get("count")
                if count is None:  # not kept by this store: count once (O(n))
                    count = self._conn.execute("SELECT COUNT(*) FROM items WHERE deleted = 0").fetchone()[0]
                segments = [self._segment(name, role, n, first_id, kind, meta)
                            for name, role, n, first_id, kind in sorted(rows, key=_segment_order)]
            finally:
                self._conn.execute("COMMIT")
        self._cache = {s.name: s for s in segments}
        return Snapshot(int(meta.get("generation", 0)), tuple(segments), deleted, int(count), meta)

    def _segment(self, name: str, role: str, n: int, first_id: int | None, kind: str,
                 meta: dict[str, Any]) -> Segment:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        vectors = self._read_array(name + ".npy")
        dim = int(meta["dim"])
        if vectors.ndim != 2 or vectors.shape != (n, dim) or vectors.dtype != np.float32:
            raise ValueError(f"{self._where(name + '.npy')}: damaged vector segment (shape {vectors.shape} "
                             f"{vectors.dtype}, expected ({n}, {dim}) float32)")
        if role == "small":
            first = int(first_id or 0)
            return Segment(name, role, "flat", np.arange(first, first + n, dtype=np.int64), vectors)
        ids = np.asarray(self._read_array(name + ".ids.npy"), dtype=np.int64)
        if ids.shape != (n,):
            raise ValueError(f"{self._where(name + '.ids.npy')}: damaged id list (shape {ids.shape}, expected ({n},))")
        if kind == "flat":
            index = faiss.IndexFlatIP(int(meta["dim"]))
            if n:
                index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        else:
            index = self._read_faiss(name + ".faiss")
            params = meta.get("main_knobs") or {}
            if kind == "hnsw" and "ef_search" in params:
                index.hnsw.efSearch = int(params["ef_search"])
        return Segment(name, role, kind, ids, vectors, index)

    def items(self, ids: Sequence[int], snap: Snapshot | None = None
              ) -> dict[int, tuple[str | None, dict[str, Any], bool]]:
        """``{id: (path, metadata, deleted)}`` for the ids that exist. With ``snap``, rows already read
        for that snapshot come from its memo (an id's path and metadata never change; a commit makes a
        new snapshot), so repeated searches of a server skip SQLite; metadata dicts are fresh copies."""
        memo: dict[int, tuple[str | None, dict[str, Any], bool]] | None = None
        if snap is not None:
            memo = snap.memo.setdefault("items", {})
        out: dict[int, tuple[str | None, dict[str, Any], bool]] = {}
        missing = []
        for i in {int(i) for i in ids if int(i) >= 0}:
            row = memo.get(i) if memo is not None else None
            if row is None:
                missing.append(i)
            else:
                out[i] = (row[0], dict(row[1]), row[2])
        if not missing:
            return out
        uniq = sorted(missing)
        read: dict[int, tuple[str | None, dict[str, Any], bool]] = {}
        with self._db:
            for s in range(0, len(uniq), 900):  # SQLite's bound-parameter limit
                chunk = uniq[s:s + 900]
                q = f"SELECT id, path, metadata, deleted FROM items WHERE id IN ({','.join('?' * len(chunk))})"
                for i, p, m, d in self._conn.execute(q, chunk):
                    read[int(i)] = (p, self._json(m, f"item {int(i)} metadata"), bool(d))
        if memo is not None:
            if len(memo) + len(read) > _ITEM_MEMO:  # bounded: a long-running server sees every id in time
                memo.clear()
            memo.update(read)
        out.update({i: (p, dict(m), d) for i, (p, m, d) in read.items()})
        return out

    def live_ids_of(self, paths: Sequence[str]) -> dict[str, int]:
        """``{path: id}`` of the given paths that are live in the store."""
        out: dict[str, int] = {}
        with self._db:
            for s in range(0, len(paths), 900):
                chunk = list(paths[s:s + 900])
                q = (f"SELECT path, id FROM items WHERE deleted = 0 AND path IN "
                     f"({','.join('?' * len(chunk))})")
                out.update({p: int(i) for p, i in self._conn.execute(q, chunk)})
        return out

    def live(self) -> list[tuple[int, str | None]]:
        """(id, path) of every live item, by id."""
        with self._db:
            return [(int(i), p) for i, p in
                    self._conn.execute("SELECT id, path FROM items WHERE deleted = 0 ORDER BY id")]

    def filter_ids(self, flt: dict[str, Any], snap: Snapshot) -> np.ndarray:
        """Sorted ids of the items of ``snap`` whose metadata equals ``flt`` on every key (see
        ``filter_query``), removed ones left out. The last few filters are remembered per commit."""
        key = (json.dumps(flt, sort_keys=True), snap.generation)
        ids = self._filters.get(key)
        if ids is None:
            sql, params = filter_query(flt)
            with self._db:
                rows = self._conn.execute(sql, params).fetchall()
            ids = np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
            if len(snap.deleted):
                ids = ids[~np.isin(ids, snap.deleted, assume_unique=True)]
            with self._db:  # threads of a server share this cache: evict under the lock
                self._filters[key] = ids
                while len(self._filters) > _FILTER_CACHE:
                    self._filters.pop(next(iter(self._filters)), None)
        return ids

    def _insert_fields(self, rows: Sequence[tuple[int, dict[str, Any]]]) -> None:
        self._conn.executemany("INSERT OR IGNORE INTO fields VALUES (?, ?, ?, ?)",
                               [f for i, m in rows for f in field_rows(i, m)])

    # ------------------------------------------------------------------ files

    def _where(self, name: str) -> str:
        return str(self.folder / name) if self.folder is not None else name

    def _read_array(self, name: str) -> np.ndarray:
        # numpy parses the header with ast: ValueError, SyntaxError, TokenError, ... on a damaged file
        return self._read(name, lambda p: np.load(p, mmap_mode="r", allow_pickle=False), "vector file", Exception)

    def _read_faiss(self, name: str) -> Any:
        # faiss reports a damaged file as a multi-line RuntimeError; on-disk inverted lists (.ivfdata)
        # are looked up beside the index file, so a moved or copied folder still finds them
        def read(path: Path) -> Any:
            if not path.with_suffix(".ivfdata").is_file():
                return faiss.read_index(str(path))
            with c_stdout_to_stderr():  # faiss says on stdout that it found the lists beside the file
                return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)

        return self._read(name, read, "FAISS index", RuntimeError)

    def _read(self, name: str, reader: Any, what: str, damaged: type[Exception]) -> Any:
        """``reader(path)`` of the file ``name`` (memory store: the object kept under it).

        FileNotFoundError when missing (the snapshot retries: a compaction may just have replaced
        it); a damaged file is one ValueError line naming it."""
        if self.folder is None:
            return self._mem[name]
        path = self.folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing")
        try:
            return reader(path)
        except FileNotFoundError:  # removed between the check and the open by a commit: the snapshot retries
            raise
        except damaged as e:
            raise ValueError(f"{path}: damaged {what} ({type(e).__name__}: {one_line(str(e))})") from e

    def _write_array(self, name: str, array: np.ndarray) -> int:
        """Write ``array`` as ``name`` durably (temp file, fsync, rename); returns bytes written."""
        if self.folder is None:
            self._mem[name] = np.array(array, copy=True)
            return int(array.nbytes)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        return self._write_bytes(name, buf.getbuffer())

    def _write_faiss(self, name: str, index: Any) -> int:
        if self.folder is None:
            self._mem[name] = index
            return 0
        # written by faiss straight to the file: serializing to bytes first held two more copies of the
        # index in memory (3x its size at the peak)
        return self._durable(name, lambda tmp: faiss.write_index(index, str(tmp)))

    def _write_bytes(self, name: str, data: Any) -> int:
        return self._durable(name, lambda tmp: tmp.write_bytes(data))

    def _copy_file(self, src: Path, name: str) -> None:
        """Copy ``src`` to ``name`` durably, file to file."""
        self._durable(name, lambda tmp: shutil.copyfile(src, tmp))

    def _durable(self, name: str, write: Callable[[Path], object]) -> int:
        """Write the file ``name`` durably: ``write(tmp)`` fills a temp file beside it, which is fsynced,
        then renamed over ``name`` (the folder is synced once per commit, by :meth:`_sync_dir`).
        Returns the file's size."""
        assert self.folder is not None
        tmp = self.folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            write(tmp)
            fsync_path(tmp)
            os.replace(tmp, self.folder / name)
        finally:
            tmp.unlink(missing_ok=True)
        return (self.folder / name).stat().st_size

    def _sync_dir(self) -> None:
        if self.folder is not None:
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _remove_files(self, names: Sequence[str]) -> None:
        for seg in names:
            for suffix in _SEGMENT_SUFFIXES:
                if self.folder is None:
                    self._mem.pop(seg + suffix, None)
                else:
                    (self.folder / (seg + suffix)).unlink(missing_ok=True)

    def _clean_orphans(self) -> None:
        """Remove segment files no committed row names and temp files (only under the write lock)."""
        if self.folder is None:
            return
        with self._db:
            known = {r[0] for r in self._conn.execute("SELECT name FROM segments")}
        known.update(self._live_claim().get("writing", []))  # a running streamed compaction's new segment
        for p in self.folder.iterdir():
            orphan = _SEGMENT_RE.match(p.name) and p.name.split(".")[0] not in known
            if orphan or (p.name.startswith(".") and p.name.endswith(".tmp")):
                log.info("%s: removing a file left by an interrupted write", p)
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Exclusive writer: threads of this process, then processes (fcntl lock on ``write.lock``)."""
        if self.read_only:
            raise PermissionError(f"{self.folder}: index opened read-only")
        with self._writer:
            if self.folder is None:
                yield
                return
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._clean_orphans()
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _segment_name(self, prefix: str, gen: int) -> str:
        return f"{prefix}-{gen:08d}-{uuid.uuid4().hex[:8]}"

    def append(self, vectors: np.ndarray, paths: Sequence[str | None],
               metadata: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Add rows as one new segment; call under :meth:`write_lock`. Paths already live are left
        out. Returns (ids of the new items, input positions kept)."""
        present = self.live_ids_of([p for p in paths if p is not None])
        seen: set[str] = set()
        keep = []
        for i, p in enumerate(paths):
            if p is None or (p not in present and p not in seen):
                keep.append(i)
                if p is not None:
                    seen.add(p)
        if not keep:
            return [], []
        meta = self.meta()
        first, gen = int(meta["next_id"]), int(meta["generation"]) + 1
        name = self._segment_name("seg", gen)
        self._write_array(name + ".npy", vectors[keep])
        self._sync_dir()
        _pause("segment-written")
        now = time.time()
        rows = [(first + j, paths[i], json.dumps(metadata[i]), name, j, now) for j, i in enumerate(keep)]
        with self._db:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT INTO items (id, path, metadata, segment, row, added) "
                                       "VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._insert_fields([(first + j, metadata[i]) for j, i in enumerate(keep)])
                self._conn.execute("INSERT INTO segments VALUES (?, 'small', ?, ?, 'flat')",
                                   (name, len(keep), first))
                self._set_meta({"next_id": first + len(keep), "generation": gen,
                                "count": int(meta["count"]) + len(keep)})
                _pause("before-commit")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        _pause("committed")
        self._merge_small()
        return [first + j for j in range(len(keep))], keep

    def _count(self) -> int:
        """The live count kept in meta (the live count is kept there by every write)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'count'").fetchone()
        return int(self._json(row[0], "meta 'count'"))

    def _set_meta(self, values: dict[str, Any]) -> None:
        self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                               [(k, json.dumps(v)) for k, v in values.items()])

    def _small_segments(self) -> list[tuple[str, int, int]]:
        """(name, n, first_id) of the small segments a merge may touch (not those a compaction folds)."""
        claimed = set(self._live_claim().get("segments", []))
        with self._db:
            rows = self._conn.execute(
                "SELECT name, n, first_id FROM segments WHERE role = 'small' ORDER BY first_id").fetchall()
        return [(r[0], int(r[1]), int(r[2])) for r in rows if r[0] not in claimed]

    def _live_claim(self) -> dict[str, Any]:
        """The running compaction's claim {"segments", "pid", "started"}, or {} (none, or its process died)."""
        claim = self.meta().get("compacting") or {}
        if not claim:
            return {}
        try:
            os.kill(int(claim["pid"]), 0)
        except ProcessLookupError:
            return {}
        except PermissionError:  # alive, another user's process
            pass
        return claim if time.time() - float(claim["started"]) < _CLAIM_MAX_AGE else {}

    def claim_compaction(self) -> Snapshot | None:
        """Under the write lock: the snapshot to compact, its segments claimed so that merges leave them
        alone while the new index is built outside the lock; None when another compaction runs."""
        if self._live_claim():
            return None
        snap = self.snapshot()
        self.set_meta({"compacting": {"segments": [s.name for s in snap.segments], "pid": os.getpid(),
                                      "started": time.time()}})
        return snap

    def release_claim(self) -> None:
        """Under the write lock: drop this process's claim (the compaction failed)."""
        if self.meta().get("compacting", {}).get("pid") == os.getpid():
            self.set_meta({"compacting": None})

    def _merge_small(self) -> None:
        """Keep O(log n) small segments: merge the two newest while the older is at most twice the
        newer (a binary counter), or all of them past a hard cap. Call under the write lock."""
        while True:
            small = self._small_segments()
            if len(small) < 2:
                return
            if len(small) > _MAX_SMALL_SEGMENTS:
                group = small
            elif small[-2][1] <= 2 * small[-1][1]:
                group = small[-2:]
            else:
                return
            self._merge(group)

    def _merge(self, group: list[tuple[str, int, int]]) -> None:
        vectors = np.concatenate([np.asarray(self._read_array(n + ".npy")) for n, _, _ in group])
        first, gen = group[0][2], self.generation() + 1
        name = self._segment_name("seg", gen)
        self._write_array(name + ".npy", vectors)
        self._sync_dir()
        old = [n for n, _, _ in group]
        marks = ",".join("?" * len(old))
        with self._db:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(f"UPDATE items SET segment = ?, row = id - ? WHERE segment IN ({marks})",
                                   [name, first, *old])
                self._conn.execute(f"DELETE FROM segments WHERE name IN ({marks})", old)
                self._conn.execute("INSERT INTO segments VALUES (?, 'small', ?, ?, 'flat')",
                                   (name, len(vectors), first))
                self._set_meta({"generation": gen})
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        self._remove_files(old)

    def mark_deleted(self, ids: Sequence[int]) -> int:
        """Mark live items deleted (call under :meth:`write_lock`); returns how many were live."""
        uniq = sorted({int(i) for i in ids})
        if not uniq:
            return 0
        with self._db:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for s in range(0, len(uniq), 900):
                    chunk = uniq[s:s + 900]
                    cur = self._conn.execute(f"UPDATE items SET deleted = 1 WHERE deleted = 0 AND id IN "
                                             f"({','.join('?' * len(chunk))})", chunk)
                    n += cur.rowcount
                if n:
                    self._set_meta({"generation": self.generation() + 1, "count": self._count() - n})
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return n

    def set_meta(self, values: dict[str, Any]) -> None:
        """Change settings (call under :meth:`write_lock`); bumps the generation."""
        with self._db:
            self._conn.execute("BEGIN IMMEDIATE")
            self._set_meta({**values, "generation": self.generation() + 1})
            self._conn.execute("COMMIT")

    def claim_new_main(self) -> str:
        """Under the write lock, by the process holding the compaction claim: a name for the main
        segment it will write outside the lock (its files are kept while the claim lives)."""
        claim = dict(self.meta().get("compacting") or {})
        name = self._segment_name("main", self.generation() + 1)
        claim["writing"] = [*claim.get("writing", []), name]
        self.set_meta({"compacting": claim})
        return name

    def install_main(self, vectors: np.ndarray | None, ids: np.ndarray, index: Any, kind: str,
                     knobs: dict[str, Any], replaces: Sequence[str], *, name: str | None = None) -> None:
        """Commit a new main segment holding ``ids`` (sorted) in place of the segments ``replaces``;
        their other rows (deleted items) are dropped. Call under :meth:`write_lock`. ``vectors`` None:
        the vector file ``name.npy`` (a name from :meth:`claim_new_main`) is already written."""
        gen = self.generation() + 1
        if vectors is None:
            assert name is not None and self.folder is not None
            vectors = self._read_array(name + ".npy")
        else:
            name = self._segment_name("main", gen)
            self._write_array(name + ".npy", vectors)
        self._write_array(name + ".ids.npy", ids)
        if kind != "flat":
            self._write_faiss(name + ".faiss", index)
        # this process already holds the index: the next snapshot need not read it back
        self._cache[name] = Segment(name, "main", kind, ids, vectors, index)
        self._sync_dir()
        _pause("compact-written")
        marks = ",".join("?" * len(replaces))
        with self._db:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("UPDATE items SET segment = ?, row = ? WHERE id = ?",
                                       ((name, r, int(i)) for r, i in enumerate(ids)))
                if replaces:
                    self._conn.execute(f"DELETE FROM items WHERE segment IN ({marks})", list(replaces))
                    self._conn.execute("DELETE FROM fields WHERE id NOT IN (SELECT id FROM items)")
                    self._conn.execute(f"DELETE FROM segments WHERE name IN ({marks})", list(replaces))
                self._conn.execute("INSERT INTO segments VALUES (?, 'main', ?, NULL, ?)", (name, len(ids), kind))
                self._set_meta({"main_kind": kind, "main_knobs": knobs, "generation": gen, "compacting": None})
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        _pause("compact-committed")
        self._remove_files(list(replaces))

    def main_segment_name(self) -> str:
        """A fresh name for the next main segment (see :meth:`insert_rows` and :meth:`commit_main`)."""
        return self._segment_name("main", self.generation() + 1)

    def insert_rows(self, rows: Sequence[tuple[int, str | None, dict[str, Any], bool]], *,
                    segment: str = "", first_row: int = -1) -> None:
        """Rows (id, path, metadata, deleted) of a main segment installed next; used when building.

        ``segment``/``first_row``: the main segment (not yet committed) whose rows ``first_row``.. hold
        these items, for :meth:`commit_main`; left empty, :meth:`install_main` fills them in."""
        now = time.time()
        with self._db:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO items (id, path, metadata, deleted, segment, row, added) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(i, p, json.dumps(m), int(d), segment, first_row + j if segment else -1, now)
                     for j, (i, p, m, d) in enumerate(rows)])
                self._insert_fields([(r[0], r[2]) for r in rows])
                self._set_meta({"next_id": max((r[0] for r in rows), default=-1) + 1,
                                "count": self._count() + sum(1 for r in rows if not r[3])})
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def commit_main(self, name: str, ids: np.ndarray, index: Any, kind: str, knobs: dict[str, Any]) -> None:
        """Commit the main segment ``name`` whose vector file ``name.npy`` (float32 (n, D), rows in
        ``ids`` order) is already written in the folder and whose items :meth:`insert_rows` stored
        with ``segment=name``: writes the ids and the FAISS index, then one commit. For a store that
        is being built (no other segment); the streamed build never copies its vectors through memory."""
        assert self.folder is not None
        vectors = self._read_array(name + ".npy")
        dim = int(self.meta()["dim"])
        if vectors.shape != (len(ids), dim) or vectors.dtype != np.float32:
            raise ValueError(f"{self._where(name + '.npy')}: shape {vectors.shape} {vectors.dtype}, "
                             f"expected ({len(ids)}, {dim}) float32")
        self._write_array(name + ".ids.npy", ids)
        if kind != "flat":
            self._write_faiss(name + ".faiss", index)
        self._sync_dir()
        _pause("compact-written")
        with self._db:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("INSERT INTO segments VALUES (?, 'main', ?, NULL, ?)", (name, len(ids), kind))
                self._set_meta({"main_kind": kind, "main_knobs": knobs, "generation": self.generation() + 1})
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ copying

    def copy_to(self, folder: Path) -> None:
        """Write a complete copy of the current state into the empty folder ``folder``."""
        snap = self.snapshot()
        dest = sqlite3.connect(str(folder / DB_FILE), isolation_level=None)
        try:
            with self._db:
                self._conn.backup(dest)
            dest.execute("PRAGMA journal_mode=WAL")
        finally:
            dest.close()
        target = Store(folder, sqlite3.connect(":memory:"))
        for seg in snap.segments:
            if self.folder is not None:  # file to file: never the whole vector file in memory
                for suffix in _SEGMENT_SUFFIXES:
                    if (self.folder / (seg.name + suffix)).is_file():
                        target._copy_file(self.folder / (seg.name + suffix), seg.name + suffix)
                continue
            target._write_array(seg.name + ".npy", np.asarray(seg.vectors))
            if seg.role == "main":
                target._write_array(seg.name + ".ids.npy", seg.ids)
                if seg.kind != "flat":
                    target._write_faiss(seg.name + ".faiss", seg.index)
        target._sync_dir()
        target.close()


def _segment_order(row: tuple[Any, ...]) -> tuple[int, int]:
    # the main segment first, then small segments by their first id (creation order)
    return (0, 0) if row[1] == "main" else (1, int(row[3]))


class _GuardedLock:
    """An RLock whose ``with`` block turns SQLite's "damaged file" errors into a ValueError naming the
    database. Only the plain ``sqlite3.DatabaseError`` (malformed image, not a database) is turned:
    its subclasses (OperationalError: locked, disk I/O, ...) keep their meaning."""

    def __init__(self, where: str) -> None:
        self._lock = threading.RLock()
        self._where = where

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._lock.release()
        if kind is sqlite3.DatabaseError:
            raise ValueError(f"{self._where}: damaged index database ({one_line(str(exc))})") from exc
