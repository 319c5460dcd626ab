"""The one adapter between the HTTP service and the index store: every call to ``Index`` lives here.

:class:`Backend` opens an index folder with :meth:`dinokit.Index.load`. A store folder opens
read-write; a folder of the old format (version 1) opens read-only, and every write answers with
a one-line hint to run ``dinokit index migrate``.

No locks here: the store gives each search one committed snapshot (segment files are never
modified), serializes writers (threads of this process and other processes, e.g. a ``dinokit
index add`` on the same folder), makes an add durable before it returns, and each call sees the
commits of other processes (one SQLite read of the generation number decides whether to re-read).

Uploaded images are kept in ``INDEX/files/`` (written and fsynced before the add that names them
commits) and stored by absolute path. Files are served only from inside the index's roots or that
folder; clients see upload paths relative to the index folder (``files/...``), not server paths.
When writes make compaction pay off, one background thread compacts (crash-safe; searches and
writes go on meanwhile).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

UPLOADS = "files"


class ReadOnlyIndexError(PermissionError):
    """A write to an index that is served read-only (an old-format folder)."""


@dataclass(frozen=True)
class Hit:
    """One search result: the item id, its stored path (None when it has none), cosine score, metadata.

    Encoded as the JSON object of its fields in this order (the ``results`` entries of ``POST /search``)."""

    id: int
    path: str | None
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


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
    """What the service needs from an index folder: search, add, get, remove, files, info."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        from dinokit.retrieval.index import Index  # the index module imports PIL and FAISS: on use only

        self.folder = Path(folder)
        self.index = Index.load(self.folder)
        self.read_only = bool(self.index.read_only)
        self._absolute = self.folder.absolute()
        self._dim = int(self.index.dim)
        self._compacting = threading.Lock()
        self._compactor: threading.Thread | None = None
        if self.read_only:
            log.warning("%s: an index of the old format, served read-only (writes are refused); convert it "
                        "with `dinokit index migrate %s`", self.folder, self.folder)
        else:
            self.uploads.mkdir(exist_ok=True)

    @property
    def uploads(self) -> Path:
        """Where uploaded images are kept: ``INDEX/files/``."""
        return self.folder / UPLOADS

    @property
    def count(self) -> int:
        return int(self.index.count)

    @property
    def dim(self) -> int:
        return self._dim  # fixed for the life of an index: not read from SQLite per query

    @property
    def kind(self) -> str:
        return str(self.index.kind)

    @property
    def feature(self) -> str:
        return str(self.index.feature)

    @property
    def model_info(self) -> dict[str, Any]:
        """The model the index records: ``source``, ``name``, ``fingerprint``, preprocessing, ..."""
        return dict(self.index.model_info or {})

    @property
    def image_size(self) -> int | None:
        """The image size the index was embedded at (None: the model's default)."""
        return self.index.image_size or self.model_info.get("image_size")

    def info(self) -> dict[str, Any]:
        """The body of ``GET /info``."""
        return {"count": self.count, "dim": self.dim, "kind": self.kind, "model": self.model_info,
                "feature": self.feature}

    # ------------------------------------------------------------------ reads

    def _shown(self, path: str | None) -> str | None:
        # uploads are stored by absolute path; clients see them relative to the index folder
        if path is None or not os.path.isabs(path):  # the common case, checked without a Path per hit
            return path
        p = Path(path)
        if p.is_relative_to(self._absolute):
            return p.relative_to(self._absolute).as_posix()
        return path

    def _rows(self, res: Any) -> list[list[Hit]]:
        """A ``SearchResult`` (ids, paths, scores, metadata: (Q, k)) -> hits per query, padding dropped."""
        assert res.metadata is not None
        return [[Hit(int(j), self._shown(p), float(s), m if m is not None else {})  # m: the index's own copy
                 for j, p, s, m in zip(res.ids[i], res.paths[i], res.scores[i], res.metadata[i], strict=True)
                 if j >= 0]
                for i in range(len(res.ids))]

    def search_vectors(self, x: np.ndarray, k: int, filt: dict[str, Any] | None) -> list[list[Hit]]:
        """Unit vectors (Q, D) -> the ``k`` best live items each that pass the equality filter ``filt``."""
        return self._rows(self.index.search_vectors(x, k, filter=filt))

    def search_by_id(self, item_id: int, k: int, filt: dict[str, Any] | None) -> list[Hit]:
        """The neighbours of a stored item (itself first unless filtered out); KeyError when unknown."""
        return self._rows(self.index.search_by_id(item_id, k, filter=filt))[0]

    def get(self, item_id: int) -> dict[str, Any]:
        """``{"id", "path", "metadata"}``; KeyError when unknown or deleted."""
        item = self.index.get(item_id)
        return {"id": int(item["id"]), "path": self._shown(item["path"]), "metadata": dict(item["metadata"] or {})}

    def file_of(self, item_id: int) -> Path | None:
        """The image file of an item, only when it lies inside the index's roots or its uploads (else None)."""
        path = self.index.get(item_id)["path"]
        if path is None:
            return None
        try:
            target = self.index.resolve(path)
        except ValueError:  # a relative path in an index without a root folder
            return None
        return inside(Path(target), [*self.index.roots, self.uploads])

    # ------------------------------------------------------------------ writes

    def check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyIndexError(f"{self.folder}: an index of the old format, served read-only; convert it "
                                     f"with `dinokit index migrate {self.folder}` and restart the server")

    def add(self, features: np.ndarray, paths: list[str], metadata: list[dict[str, Any]]
            ) -> tuple[list[int], list[tuple[str, str]]]:
        """Add vectors (N, D) with their paths and metadata; durable when it returns: (ids, skipped)."""
        self.check_writable()
        res = self.index.add(features=features, paths=paths, metadata=metadata)
        self._maybe_compact()
        return [int(i) for i in res.ids], [(str(n), str(r)) for n, r in res.skipped]

    def remove(self, item_id: int) -> None:
        """Delete one item (durable when it returns); KeyError when unknown or already deleted."""
        self.check_writable()
        if not self.index.remove([item_id], compact=False):
            raise KeyError(f"id {item_id}: not in the index")
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        """Start a background compaction when the index says it pays off and none is running."""
        if self._compacting.locked() or not self.index.needs_compaction:
            return
        self._compactor = threading.Thread(target=self._compact, name="dinokit-compact", daemon=True)
        self._compactor.start()

    def _compact(self) -> None:
        if not self._compacting.acquire(blocking=False):
            return
        try:
            self.index.compact()
            log.info("%s: compacted (%d items, %s)", self.folder, self.count, self.kind)
        except Exception:  # the server goes on with the uncompacted (still correct) index
            log.exception("%s: background compaction failed", self.folder)
        finally:
            self._compacting.release()
