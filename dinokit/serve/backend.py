"""The one adapter between the HTTP service and the index store: every call to ``Index`` lives here.

:func:`open_backend` returns a :class:`Backend` over an index folder. Two implementations:

- :class:`StoreBackend` over the durable store API (``Index.load(folder, read_only=False)``,
  ``add(features=, paths=, metadata=) -> AddResult``, ``search_vectors``, ``search_by_id``, ``get``,
  ``remove``, ``resolve``, ``roots``, ``refresh``): used whenever ``Index`` has ``search_vectors``.
- :class:`LegacyBackend` over the folder format of ``dinokit/retrieval/index.py`` (one FAISS file
  rewritten on save). It never rewrites that folder: adds and removes go to an fsynced journal
  (``INDEX/files/journal.jsonl``) that the next start replays, so an acknowledged write survives a
  kill -9. Ids are FAISS positions; items indexed before serving have metadata ``{}``.

Both serialize writes against searches with a readers-writer lock (FAISS may not search while it adds).
Uploaded images are kept in ``INDEX/files/``, which is always one of the roots files are served from.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

UPLOADS = "files"
JOURNAL = "journal.jsonl"
_REFRESH_EVERY_S = 1.0


@dataclass(frozen=True)
class Hit:
    """One search result: the item id, its stored path, cosine score and metadata."""

    id: int
    path: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "score": self.score, "metadata": self.metadata}


class RWLock:
    """Many readers or one writer (writers are not starved: a waiting writer blocks new readers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def matches(metadata: dict[str, Any], filt: dict[str, Any] | None) -> bool:
    """Equality filter: every key of ``filt`` present in ``metadata`` with an equal value."""
    return not filt or all(k in metadata and metadata[k] == v for k, v in filt.items())


def inside(path: Path, roots: Sequence[Path]) -> Path | None:
    """``path`` with symlinks resolved when it is a regular file inside one of ``roots`` (also resolved),
    else None: a ``..`` or a symlink that leads out of every root is refused."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    if not real.is_file():
        return None
    for root in roots:
        try:
            if real.is_relative_to(root.resolve(strict=True)):
                return real
        except (OSError, RuntimeError):
            continue
    return None


class Backend:
    """What the service needs from an index; see the two implementations below."""

    folder: Path
    lock: RWLock

    @property
    def uploads(self) -> Path:
        """Where uploaded images are kept: ``INDEX/files/``."""
        return self.folder / UPLOADS

    # the interface; each implementation fills these in
    count: int
    dim: int
    kind: str
    feature: str
    model_info: dict[str, Any]

    def search_vectors(self, x: np.ndarray, k: int, filt: dict[str, Any] | None) -> list[list[Hit]]:
        raise NotImplementedError

    def search_by_id(self, item_id: int, k: int, filt: dict[str, Any] | None) -> list[Hit]:
        raise NotImplementedError

    def add(self, features: np.ndarray, paths: list[str], metadata: list[dict[str, Any]]
            ) -> tuple[list[int], list[tuple[str, str]]]:
        raise NotImplementedError

    def remove(self, item_id: int) -> bool:
        raise NotImplementedError

    def get(self, item_id: int) -> dict[str, Any]:
        raise NotImplementedError

    def file_of(self, item_id: int) -> Path | None:
        """The image file of an item, only when it lies inside the index's roots (else None)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """The body of ``GET /info``."""
        return {"count": self.count, "dim": self.dim, "kind": self.kind, "model": self.model_info,
                "feature": self.feature}


def open_backend(folder: str | os.PathLike[str]) -> Backend:
    """The backend for an index folder: the durable store when this dinokit has it, else the legacy one."""
    from dinokit.retrieval.index import Index

    if hasattr(Index, "search_vectors"):
        return StoreBackend(Path(folder))
    return LegacyBackend(Path(folder))


# ---------------------------------------------------------------------------------- the durable store


class StoreBackend(Backend):
    """Over the durable index store (SQLite + FAISS segments): ids, metadata and filters are its own."""

    def __init__(self, folder: Path) -> None:
        from dinokit.retrieval.index import Index

        self.folder = folder
        self.lock = RWLock()
        self.index = Index.load(folder, read_only=False)
        self._refreshed = time.monotonic()
        self.uploads.mkdir(exist_ok=True)

    count = property(lambda self: int(self.index.count))  # type: ignore[assignment]
    dim = property(lambda self: int(self.index.dim))  # type: ignore[assignment]
    kind = property(lambda self: str(self.index.kind))  # type: ignore[assignment]
    feature = property(lambda self: str(self.index.feature))  # type: ignore[assignment]
    model_info = property(lambda self: dict(self.index.model_info or {}))  # type: ignore[assignment]

    def _maybe_refresh(self) -> None:
        # other processes may write to the same folder: pick their commits up about once a second
        if time.monotonic() - self._refreshed > _REFRESH_EVERY_S:
            with self.lock.write():
                self.index.refresh()
                self._refreshed = time.monotonic()

    def _rows(self, res: Any) -> list[list[Hit]]:
        rows = []
        for i in range(res.ids.shape[0]):
            rows.append([Hit(int(j), str(res.paths[i][c]), float(res.scores[i][c]), dict(res.metadata[i][c] or {}))
                         for c, j in enumerate(res.ids[i]) if j >= 0])
        return rows

    def search_vectors(self, x: np.ndarray, k: int, filt: dict[str, Any] | None) -> list[list[Hit]]:
        self._maybe_refresh()
        with self.lock.read():
            return self._rows(self.index.search_vectors(x, k, filter=filt))

    def search_by_id(self, item_id: int, k: int, filt: dict[str, Any] | None) -> list[Hit]:
        self._maybe_refresh()
        with self.lock.read():
            return self._rows(self.index.search_by_id(item_id, k, filter=filt))[0]

    def add(self, features: np.ndarray, paths: list[str], metadata: list[dict[str, Any]]
            ) -> tuple[list[int], list[tuple[str, str]]]:
        with self.lock.write():
            res = self.index.add(features=features, paths=paths, metadata=metadata)
        return [int(i) for i in res.ids], [(str(n), str(r)) for n, r in res.skipped]

    def remove(self, item_id: int) -> bool:
        with self.lock.write():
            return int(self.index.remove([item_id])) > 0

    def get(self, item_id: int) -> dict[str, Any]:
        with self.lock.read():
            item = self.index.get(item_id)  # KeyError when unknown or deleted
        return {"id": int(item["id"]), "path": str(item["path"]), "metadata": dict(item.get("metadata") or {})}

    def file_of(self, item_id: int) -> Path | None:
        with self.lock.read():
            path = self.index.get(item_id)["path"]
            target = self.index.resolve(path)
            roots = [Path(r) for r in self.index.roots]
        return inside(Path(target), [*roots, self.uploads])


# ---------------------------------------------------------------------------------- the legacy folder


class LegacyBackend(Backend):
    """Over ``dinokit/retrieval/index.py`` folders: the folder is read once, writes go to a journal."""

    def __init__(self, folder: Path) -> None:
        from dinokit.retrieval.index import Index

        self.folder = folder
        self.lock = RWLock()
        self.index = Index.load(folder)
        self.metadata: dict[int, dict[str, Any]] = {}
        self.deleted: set[int] = set()
        self._writing = threading.Lock()  # one add/remove at a time: ids follow the journal's order
        self.uploads.mkdir(exist_ok=True)
        self._journal = self.uploads / JOURNAL
        self._replay()

    @property
    def count(self) -> int:  # type: ignore[override]
        return len(self.index) - len(self.deleted)

    dim = property(lambda self: int(self.index.dim))  # type: ignore[assignment]
    kind = property(lambda self: str(self.index.kind))  # type: ignore[assignment]
    feature = property(lambda self: str(self.index.feature_kind))  # type: ignore[assignment]

    @property
    def model_info(self) -> dict[str, Any]:  # type: ignore[override]
        return {**(self.index.model_identity or {}), "source": self.index.model_source,
                "image_size": self.index.image_size}

    # -------------------------------------------------------------- journal

    def _replay(self) -> None:
        """Fold the journal into the in-memory index; cut a torn last line (a write never acknowledged)."""
        if not self._journal.exists():
            return
        good = 0
        with open(self._journal, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break
                self._apply(rec)
                good += len(line)
        if good != self._journal.stat().st_size:
            log.warning("%s: dropping a torn last record (%d bytes)", self._journal,
                        self._journal.stat().st_size - good)
            os.truncate(self._journal, good)

    def _apply(self, rec: dict[str, Any]) -> None:
        if rec["op"] == "add":
            x = np.frombuffer(base64.b64decode(rec["vectors"]), dtype=np.float32).reshape(len(rec["ids"]), -1)
            if rec["ids"] and rec["ids"][0] != self.index.ntotal:
                raise ValueError(f"{self._journal}: out of step with the index folder (was it rebuilt?)")
            self.index.add(features=x, paths=rec["paths"])
            for i, m in zip(rec["ids"], rec["metadata"], strict=True):
                self.metadata[int(i)] = m
        elif rec["op"] == "remove":
            self.deleted.update(int(i) for i in rec["ids"])

    def _append(self, rec: dict[str, Any]) -> None:
        """Append one record and fsync it: once this returns, the write survives a crash."""
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        new = not self._journal.exists()
        with open(self._journal, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one writer at a time, across processes too
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:  # the journal's directory entry must be durable as well
            fd = os.open(self.uploads, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -------------------------------------------------------------- reads

    def _path(self, item_id: int) -> str:
        """The stored path of a live item; KeyError when unknown or deleted."""
        paths = self.index._paths  # legacy Index keeps position -> path only privately
        if not 0 <= item_id < len(paths) or paths[item_id] is None or item_id in self.deleted:
            raise KeyError(f"item {item_id}: not in the index")
        return str(paths[item_id])

    def _shown(self, path: str) -> str:
        # uploads are stored by absolute path; clients see them relative to the index folder
        p = Path(path)
        if p.is_absolute() and p.is_relative_to(self.folder.absolute()):
            return p.relative_to(self.folder.absolute()).as_posix()
        return path

    def _hits(self, ids: np.ndarray, scores: np.ndarray, k: int, filt: dict[str, Any] | None,
              skip: int | None = None) -> list[Hit]:
        hits: list[Hit] = []
        for j, s in zip(ids, scores, strict=True):
            j = int(j)
            if j < 0 or j in self.deleted or j == skip:
                continue
            meta = self.metadata.get(j, {})
            if matches(meta, filt):
                hits.append(Hit(j, self._shown(self._path(j)), float(s), meta))
                if len(hits) == k:
                    break
        return hits

    def search_vectors(self, x: np.ndarray, k: int, filt: dict[str, Any] | None) -> list[list[Hit]]:
        with self.lock.read():
            total = len(self.index)
            fetch = min(total, k + len(self.deleted))
            while True:
                res = self.index.search(x, k=max(1, fetch)) if total else None
                rows = [self._hits(res.ids[i], res.scores[i], k, filt) if res else [] for i in range(len(x))]
                # deleted and filtered-out items use up places: look further until k pass or all are seen
                if fetch >= total or all(len(r) == k for r in rows):
                    return rows
                fetch = min(total, fetch * 4)

    def search_by_id(self, item_id: int, k: int, filt: dict[str, Any] | None) -> list[Hit]:
        with self.lock.read():
            vec = self.index.vectors([self._path(item_id)])
        return self.search_vectors(vec, k, filt)[0]

    def get(self, item_id: int) -> dict[str, Any]:
        with self.lock.read():
            return {"id": item_id, "path": self._shown(self._path(item_id)),
                    "metadata": self.metadata.get(item_id, {})}

    def file_of(self, item_id: int) -> Path | None:
        with self.lock.read():
            target = self.index.resolve(self._path(item_id))
        roots = [Path(self.index.root)] if self.index.root else []
        return inside(Path(target), [*roots, self.uploads])

    # -------------------------------------------------------------- writes

    def add(self, features: np.ndarray, paths: list[str], metadata: list[dict[str, Any]]
            ) -> tuple[list[int], list[tuple[str, str]]]:
        from dinokit.retrieval.index import normalize

        x = normalize(features)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, the index holds dimension {self.dim}")
        keys = [os.path.abspath(p) for p in paths]
        # the fsync happens under the writers' mutex only: searches go on meanwhile, and are held
        # back just for the in-memory add that follows it
        with self._writing:
            taken = [k for k in keys if k in self.index]
            if taken:
                raise ValueError(f"{taken[0]}: already in the index")
            start = self.index.ntotal
            ids = list(range(start, start + len(keys)))
            self._append({"op": "add", "ids": ids, "paths": keys, "metadata": metadata,
                          "vectors": base64.b64encode(x.tobytes()).decode()})
            with self.lock.write():
                self.index.add(features=x, paths=keys)
                self.metadata.update(zip(ids, metadata, strict=True))
        return ids, []

    def remove(self, item_id: int) -> bool:
        with self._writing:
            self._path(item_id)  # KeyError when unknown or already deleted
            self._append({"op": "remove", "ids": [item_id]})
            with self.lock.write():
                self.deleted.add(item_id)
        return True
