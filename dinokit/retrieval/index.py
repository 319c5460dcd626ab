"""FAISS image search over DINO features: build, add, remove, search, save and load.

An :class:`Index` holds L2-normalized features (so inner product = cosine similarity), the path and
metadata of every item under an integer id, and what made the features: the model's identity
(source, name, fingerprint, preprocessing), the feature kind ("cls", ...) and the image size.
Searching with another model or feature kind than the one the index was built with is an error.

An index lives in memory (:meth:`Index.build`, :meth:`Index.from_features`) until saved, or in a
folder (:meth:`Index.create`, :meth:`Index.load`): a store (see :mod:`dinokit.retrieval.store`)
where every add, remove and compaction is durable when it returns and any number of processes
read and write at once. Kinds and knobs: :mod:`dinokit.retrieval.kinds`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from dinokit._io import recover_folder
from dinokit._types import Progress
from dinokit.retrieval.folder import check_index_target, is_v1_folder, read_v1, v1_settings, write_folder
from dinokit.retrieval.kinds import (
    DEFAULT_MEMORY_BUDGET,
    SEARCH_KNOBS,
    Knob,
    build_faiss,
    check_kind,
    faiss,
    memory_per_vector,
    normalize,
    resolve_kind,
)
from dinokit.retrieval.metadata import Filter, MetadataLike, check_metadata, read_metadata_file
from dinokit.retrieval.search import search_snapshot
from dinokit.retrieval.store import FORMAT_VERSION, Store

log = logging.getLogger(__name__)

# The vision stack (torch, torchvision, timm: seconds to import) is imported inside the functions that
# embed images, so that processes that only add or search vectors (writers, servers' workers) start fast.

if TYPE_CHECKING:  # annotations only, for the same reason
    from typing import TypeAlias

    import torch
    from torch import nn

    from dinokit.embedding import Embeddings

    #: feature vectors, (N, D) or (D,)
    Vectors: TypeAlias = np.ndarray | torch.Tensor
    #: a folder of images, one image path, or image paths
    ImagePaths: TypeAlias = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
    #: what :meth:`Index.search` accepts: vectors, embeddings, or images (paths or PIL) to embed
    Queries: TypeAlias = (Vectors | Embeddings | Image.Image | str | os.PathLike[str]
                          | Sequence[str | os.PathLike[str] | Image.Image])
    Device: TypeAlias = str | torch.device | None

_COMPACT_FRACTION = 0.25  # remove() compacts once this share of the stored vectors is deleted


class ModelMismatchError(ValueError):
    """Queries embedded with another model (or feature kind) than the one the index was built with."""


@dataclass(frozen=True)
class SearchResult:
    """The k nearest neighbours of each query, best first.

    ``ids``: int64 (Q, k) item ids (-1 where fewer than k results); ``paths``: object (Q, k) stored
    paths (None where missing); ``scores``: float32 (Q, k) cosine similarities (NaN where missing);
    ``metadata``: object (Q, k) of dicts (None where missing).
    """

    ids: np.ndarray
    paths: np.ndarray
    scores: np.ndarray
    metadata: np.ndarray | None = None
    query_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.metadata is None:
            meta = np.empty(self.ids.shape, dtype=object)
            for pos in zip(*np.nonzero(self.ids >= 0), strict=True):
                meta[pos] = {}
            object.__setattr__(self, "metadata", meta)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready: one dict per query with its name and its results (rank, id, path, score, metadata)."""
        rows = []
        assert self.metadata is not None
        for i in range(len(self)):
            results = [
                {"rank": r + 1, "id": int(j), "path": p, "score": float(s), "metadata": m}
                for r, (j, p, s, m) in enumerate(zip(self.ids[i], self.paths[i], self.scores[i],
                                                     self.metadata[i], strict=True))
                if j >= 0
            ]
            name = self.query_names[i] if i < len(self.query_names) else str(i)
            rows.append({"query": name, "results": results})
        return rows

    def __repr__(self) -> str:
        k = self.ids.shape[1] if self.ids.ndim == 2 else 0
        best = ""
        if len(self) and k and self.ids[0, 0] >= 0:
            best = f", best={self.paths[0, 0]!r} ({float(self.scores[0, 0]):.3f})"
        return f"SearchResult(queries={len(self)}, k={k}{best})"


@dataclass(frozen=True)
class AddResult:
    """What an add did: ``ids`` of the new items (input order), ``skipped`` (name, reason)."""

    ids: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def describe_model(model: nn.Module, *, source: str | None = None,
                   image_size: int | None = None) -> dict[str, Any]:
    """What an index records about the model that made its features: source (how to load it again),
    name, arch, fingerprint, feature size, preprocessing and image size."""
    from dinokit.models.backbone import identity  # the vision stack: see the note at the top

    ident = identity(model)
    prep = {k: ident.pop(k) for k in ("input_size", "mean", "std", "crop_pct", "interpolation")}
    return {"source": source or _source_of(model), **ident, "preprocessing": prep, "image_size": image_size}


class Index:
    """Image features with ids, paths and metadata, searchable by image, vector, id and filter.

    Create with :meth:`build` (a folder + a model), :meth:`from_features`, :meth:`create` (an empty
    folder store) or :meth:`load`.
    """

    def __init__(self, store: Store, *, origin: str | None = None) -> None:
        self._store = store
        self._origin = origin  # the version-1 folder a read-only index was read from
        # the model that embeds image queries when search/add get no model= (set by build, or loaded
        # from the recorded source on first use)
        self.model: nn.Module | None = None
        self.skipped: list[tuple[str, str]] = []  # what Index.build left out: (path, reason)
        self._fp_cache: dict[int, str] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, folder: str | os.PathLike[str], *, dim: int, kind: str = "auto",
               model_info: dict[str, Any] | None = None, feature: str = "cls", image_size: int | None = None,
               root: str | os.PathLike[str] | None = None, **knobs: Knob) -> Index:
        """An empty index store in ``folder`` (absent or empty) for ``dim``-d features of ``kind``."""
        check_kind(kind)
        folder = Path(folder)
        check_index_target(folder)
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder}: already holds an index")
        if image_size is None and model_info:
            image_size = model_info.get("image_size")
        return cls(Store.create(folder, _settings(dim, kind, knobs, model_info, feature, image_size, root)))

    @classmethod
    def from_features(cls, features: Vectors, paths: Sequence[str | os.PathLike[str] | None], kind: str = "auto",
                      *,
                      metadata: MetadataLike | None = None, model_info: dict[str, Any] | None = None,
                      feature: str = "cls", root: str | os.PathLike[str] | None = None,
                      image_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                      **knobs: Knob) -> Index:
        """An in-memory index of ``features`` (N, D) with their ``paths`` (N,), ids 0..N-1.

        ``kind``: "flat" | "hnsw" | "ivfpq" | "auto"; ``knobs`` override the kind's defaults (e.g.
        ``M=16, ef_search=128`` or ``nlist=1024, nprobe=8, refine="sq8"``). ``metadata``: a dict per
        item, a mapping path -> dict, or a CSV / JSON-lines / parquet file with a ``path`` column.
        Duplicate paths are an error. Features are L2-normalized: scores are cosine similarities.
        """
        check_kind(kind)
        x = normalize(features)
        root_s = None if root is None else _abs(root)
        keys = [None if p is None else _key(p, root_s) for p in paths]
        if len(keys) != len(x):
            raise ValueError(f"{len(x)} feature rows but {len(keys)} paths")
        if len(x) == 0:
            raise ValueError("cannot build an index from zero vectors")
        dup = _first_duplicate(keys)
        if dup is not None:
            raise ValueError(f"{dup}: path given twice")
        dim = x.shape[1]
        real_kind, full = resolve_kind(kind, dim, len(x), dict(knobs), memory_budget)
        store = Store.memory(_settings(dim, kind, knobs, model_info, feature, image_size, root_s))
        metas = _metadata_rows(metadata, keys, [None if p is None else str(p) for p in paths], root_s)
        store.insert_rows([(i, keys[i], metas[i], False) for i in range(len(x))])
        store.install_main(x, np.arange(len(x), dtype=np.int64), build_faiss(real_kind, x, full), real_kind,
                           full, replaces=[])
        return cls(store)

    @classmethod
    def from_shards(cls, features_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, kind: str = "auto",
                    memory_budget: int | str = DEFAULT_MEMORY_BUDGET, metadata: MetadataLike | None = None,
                    model_source: str | None = None, progress: Progress | None = None,
                    shards: tuple[int, int] | None = None, trained_from: str | os.PathLike[str] | None = None,
                    **knobs: Knob) -> Index:
        """Index a sharded feature folder (``dinokit embed --out DIR``) into the folder ``out``, streaming
        it shard by shard under ``memory_budget`` (bytes or "4GB"); ids are the rows' global numbers.
        See :func:`dinokit.retrieval.stream.build_from_shards`. Returns the index opened from ``out``."""
        from dinokit.retrieval.stream import build_from_shards

        check_kind(kind)
        build_from_shards(features_dir, out, kind=kind, memory_budget=memory_budget, metadata=metadata,
                          model_source=model_source, progress=progress, shards=shards,
                          trained_from=trained_from, **knobs)  # type: ignore[arg-type]
        return cls.load(out)

    @classmethod
    def merge(cls, inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
              memory_budget: int | str = DEFAULT_MEMORY_BUDGET, progress: Progress | None = None) -> Index:
        """Join index folders built from disjoint items (e.g. shard ranges on several machines) into the
        folder ``out``; see :func:`dinokit.retrieval.stream.merge_indexes`. Returns the merged index."""
        from dinokit.retrieval.stream import merge_indexes

        merge_indexes(inputs, out, memory_budget=memory_budget, progress=progress,
                      on_renumber=lambda why: log.warning("%s", why))
        return cls.load(out)

    @classmethod
    def build(cls, folder_or_paths: ImagePaths, model: nn.Module, kind: str = "auto", *,
              metadata: MetadataLike | None = None, batch_size: int = 64, device: Device = None,
              num_workers: int | None = None, image_size: int | None = None, feature: str = "cls",
              progress: Progress | None = None, model_source: str | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET, follow_links: bool = False, **knobs: Knob) -> Index:
        """Embed every image under a folder (or a list of image paths) with ``model`` and index them.

        Paths are stored relative to the folder (for a list: to the folder that holds them all).
        Unreadable images and files the folder walk skips are left out and listed in
        ``index.skipped`` as (path, reason). ``follow_links``: walk into links that lead outside the
        folder. ``model_source`` (how to load the model again) defaults to the source
        ``dinokit.load`` was given, made absolute for local paths. ``metadata``: as in
        :meth:`from_features`.
        """
        from dinokit.data.images import list_images
        from dinokit.embedding import embed  # the vision stack: see the note at the top

        images: str | list[str]
        if isinstance(folder_or_paths, (str, os.PathLike)) and Path(folder_or_paths).is_dir():
            root, images = _abs(folder_or_paths), os.fspath(folder_or_paths)
            metadata = _by_input(metadata, lambda: [_abs(p) for p in list_images(folder_or_paths,
                                                                                   follow_links=follow_links)])
        else:
            items = [folder_or_paths] if isinstance(folder_or_paths, (str, os.PathLike)) else list(folder_or_paths)
            given = [Path(_abs(p)) for p in items]
            if not given:
                raise ValueError("no images given to index")
            root = os.path.commonpath([str(p.parent) for p in given])
            images = [str(p) for p in given]
            metadata = _by_input(metadata, lambda: images)
        emb = embed(model, images, batch_size=batch_size, device=device, num_workers=num_workers,
                    image_size=image_size, features=feature, progress=progress, follow_links=follow_links)
        if len(emb.paths) == 0:
            raise ValueError(f"{folder_or_paths}: no usable images to index")
        paths = emb.paths if not isinstance(images, list) else \
            [str(_match_path(p, [Path(i) for i in images])) for p in emb.paths]
        size = emb.info.get("image_size") or image_size
        index = cls.from_features(emb.features, paths, kind, metadata=metadata, feature=feature, root=root,
                                  model_info=describe_model(model, source=model_source, image_size=size),
                                  image_size=size, memory_budget=memory_budget, **knobs)
        index.model = model  # later searches by image need no model=
        index.skipped = list(emb.skipped)
        return index

    @classmethod
    def load(cls, folder: str | os.PathLike[str], read_only: bool = False) -> Index:
        """Open an index folder: a store (shared with other processes: see :meth:`refresh`), or a
        version-1 folder (index.faiss + meta.json + paths.json), which opens read-only."""
        folder = Path(folder)
        recover_folder(folder)  # a save killed between its renames: finish it or roll it back
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such index folder")
        if is_v1_folder(folder):
            return cls._from_v1(folder)
        return cls(Store.open(folder, read_only=read_only))

    @classmethod
    def _from_v1(cls, folder: Path) -> Index:
        old = read_v1(folder)
        store = Store.memory(v1_settings(old.meta))
        store.insert_rows([(i, p, {}, p is None) for i, p in enumerate(old.paths)])
        n = old.index.ntotal
        vectors = old.index.reconstruct_n(0, n) if n else np.zeros((0, int(old.meta["dim"])), np.float32)
        knobs = dict(old.meta.get("knobs") or {})
        store.install_main(vectors, np.arange(n, dtype=np.int64), old.index, old.meta["kind"], knobs, replaces=[])
        store.read_only = True
        log.info("%s: a version-1 index folder, opened read-only (convert it with `dinokit index migrate`)",
                 folder)
        return cls(store, origin=str(folder))

    # ------------------------------------------------------------------ settings and content

    @property
    def _meta(self) -> dict[str, Any]:
        return self._store.snapshot().meta

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def kind(self) -> str:
        """The kind of the compacted main index (the requested kind while there is none)."""
        meta = self._meta
        return str(meta.get("main_kind") or meta["kind"])

    @property
    def knobs(self) -> dict[str, Knob]:
        meta = self._meta
        return dict(meta.get("main_knobs") or meta.get("knobs") or {})

    @property
    def feature(self) -> str:
        return str(self._meta.get("feature", "cls"))

    @property
    def model_info(self) -> dict[str, Any] | None:
        info = self._meta.get("model")
        return dict(info) if info else None

    @property
    def image_size(self) -> int | None:
        return self._meta.get("image_size")

    @property
    def root(self) -> str | None:
        """The folder relative paths are stored against (the folder :meth:`build` indexed)."""
        return self._meta.get("root")

    @property
    def roots(self) -> list[Path]:
        """Folders the stored images lie in (the build folder and folders added later)."""
        return [Path(r) for r in self._meta.get("roots") or []]

    @property
    def folder(self) -> Path | None:
        return self._store.folder

    @property
    def read_only(self) -> bool:
        return self._store.read_only

    @property
    def count(self) -> int:
        """Live (not removed) items."""
        return self._store.snapshot().count

    def __len__(self) -> int:
        return self.count

    @property
    def ntotal(self) -> int:
        """Stored vectors, removed ones included until the next compaction."""
        return self._store.snapshot().ntotal

    @property
    def pending(self) -> int:
        """Vectors in small segments (searched exactly) that :meth:`compact` would fold into the main index."""
        return sum(len(s.ids) for s in self._store.snapshot().segments if s.role == "small")

    @property
    def needs_compaction(self) -> bool:
        """True when small segments or deleted vectors have grown enough that :meth:`compact` pays off."""
        snap = self._store.snapshot()
        main = sum(len(s.ids) for s in snap.segments if s.role == "main")
        return self.pending > max(20_000, main // 4) or len(snap.deleted) > _COMPACT_FRACTION * max(1, snap.ntotal)

    # legacy names (dinokit <= 0.1): the same values
    feature_kind = feature
    model_identity = model_info

    @property
    def model_source(self) -> str | None:
        return (self.model_info or {}).get("source")

    @property
    def paths(self) -> list[str | None]:
        """The live paths, by id."""
        return [p for _, p in self._store.live()]

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, (str, os.PathLike)):
            return False
        key = self._key(path)
        return bool(self._store.live_ids_of([key]))

    def id_of(self, path: str | os.PathLike[str]) -> int:
        """The id of a live stored path (KeyError when absent)."""
        key = self._key(path)
        found = self._store.live_ids_of([key])
        if key not in found:
            raise KeyError(f"{key}: not in the index")
        return found[key]

    def get(self, id: int) -> dict[str, Any]:
        """``{"id", "path", "metadata"}`` of a live item; KeyError when unknown or removed."""
        row = self._store.items([int(id)]).get(int(id))
        if row is None or row[2]:
            raise KeyError(f"id {id}: not in the index")
        return {"id": int(id), "path": row[0], "metadata": row[1]}

    def resolve(self, path: str) -> Path:
        """The absolute file a stored path points to (relative paths are joined to :attr:`root`)."""
        p = Path(path)
        if not p.is_absolute():
            if self.root is None:
                raise ValueError(f"{path}: a relative path in an index that records no root folder")
            p = Path(self.root) / p
        return Path(_abs(p))

    def _key(self, path: str | os.PathLike[str]) -> str:
        return _key(path, self.root)

    def vector(self, id: int) -> np.ndarray:
        """The stored (normalized) float32 vector (D,) of a live item; KeyError when absent."""
        self.get(id)  # KeyError for unknown / removed ids
        for seg in self._store.snapshot().segments:
            pos = int(np.searchsorted(seg.ids, id))
            if pos < len(seg.ids) and seg.ids[pos] == id:
                return np.array(seg.vectors[pos], dtype=np.float32)
        raise KeyError(f"id {id}: not in the index (committed after this snapshot?)")

    def vectors(self, paths: Iterable[str] | None = None) -> np.ndarray:
        """Stored vectors (N, D) of ``paths`` (all live ones by default), float32."""
        ids = [i for i, _ in self._store.live()] if paths is None else [self.id_of(p) for p in paths]
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.vector(i) for i in ids])

    def refresh(self) -> None:
        """See commits other processes made since the last call (cheap when there were none)."""
        self._store.snapshot()

    # ------------------------------------------------------------------ add / remove / compact

    def add(self, items: ImagePaths | None = None, *, features: Vectors | None = None,
            paths: Sequence[str | os.PathLike[str] | None] | None = None,
            metadata: MetadataLike | None = None, model: nn.Module | None = None, batch_size: int = 64,
            device: Device = None, num_workers: int | None = None, progress: Progress | None = None) -> AddResult:
        """Add images or vectors; paths already in the index are skipped. Durable when it returns.

        ``items``: a folder (every image under it) or image paths, embedded with ``model`` (default:
        the model of :meth:`build`, else the one recorded in the index; it must be the model the index
        was built with). Or ``features`` (N, D) with ``paths``. ``metadata``: a dict per item (input
        order), a mapping path -> dict, or a CSV / JSON-lines / parquet file with a ``path`` column.
        """
        self._writable()
        if features is not None:
            if paths is None:
                raise ValueError("add(features=...) needs paths=")
            raw: list[str | None] = [None if p is None else str(os.fspath(p)) for p in paths]
            x, skipped = normalize(features), list[tuple[str, str]]()
            if len(raw) != len(x):
                raise ValueError(f"{len(x)} feature rows but {len(raw)} paths")
            new_roots: list[str] = []
        else:
            if items is None:
                raise ValueError("add() needs a folder, image paths, or features= and paths=")
            candidates, new_roots = _candidates(items)
            metadata = _by_input(metadata, lambda: [str(p) for p in candidates])
            x, embedded, skipped = self._embed_new(candidates, model, batch_size=batch_size, device=device,
                                                   num_workers=num_workers, progress=progress)
            raw = list(embedded)
        if len(x) and x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, the index holds dimension {self.dim}")
        keys = [None if p is None else self._key(p) for p in raw]
        metas = _metadata_rows(metadata, keys, raw, self.root)
        if not keys:
            return AddResult([], skipped)
        with self._store.write_lock():
            self._add_roots(new_roots)
            ids, kept = self._store.append(x, keys, metas)
        kept_set = set(kept)
        skipped += [(str(keys[i]), "already in the index") for i in range(len(keys)) if i not in kept_set]
        self._store.snapshot()
        return AddResult(ids, skipped)

    def _embed_new(self, candidates: list[Path], model: Any, **kw: Any
                   ) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        """Embed the images among ``candidates`` not yet in the index: (vectors, absolute paths, skipped)."""
        from dinokit.embedding import embed  # the vision stack: see the note at the top

        model = self._model_for(model, "add(images)")
        self._check_model(model)
        present = self._store.live_ids_of([self._key(p) for p in candidates])
        skipped = [(str(p), "already in the index") for p in candidates if self._key(p) in present]
        todo = [p for p in candidates if self._key(p) not in present]
        if not todo:
            return np.zeros((0, self.dim), np.float32), [], skipped
        emb = embed(model, [str(p) for p in todo], features=self.feature, image_size=self.image_size, **kw)
        skipped += [(str(p), reason) for p, reason in emb.skipped]
        paths = [str(_match_path(p, todo)) for p in emb.paths]
        x = normalize(emb.features) if paths else np.zeros((0, self.dim), np.float32)
        return x, paths, skipped

    def _add_roots(self, folders: list[str]) -> None:
        roots = list(self._store.meta().get("roots") or [])
        new = [f for f in folders if not any(f == r or f.startswith(r.rstrip("/") + "/") for r in roots)]
        if new:
            self._store.set_meta({"roots": roots + new})

    def remove(self, ids: Iterable[int], *, compact: bool = True) -> int:
        """Remove items by id (unknown or removed ids are ignored); returns how many were removed.

        Removed items are filtered out at search time; once a quarter of the stored vectors are
        removed the index is compacted (unless ``compact=False``: a server compacts in the background)."""
        self._writable()
        with self._store.write_lock():
            n = self._store.mark_deleted([int(i) for i in ids])
        snap = self._store.snapshot()
        if compact and n and len(snap.deleted) > _COMPACT_FRACTION * snap.ntotal:
            self.compact()
        return n

    def compact(self, *, memory_budget: int | None = None) -> bool:
        """Fold small segments and drop removed vectors: one main index of the chosen kind ("auto" is
        decided again for the live count and ``memory_budget``: by default the budget the index was
        built under, else 8 GB; IVF-PQ trained when the size calls for it).

        An IVF-PQ that re-ranks from disk (``refine="disk"``) and keeps its layout is compacted by
        streaming: the live vectors are copied file to file in chunks into the new segment and re-added
        to a copy of its trained index. Other kinds load the live vectors into memory (4*D bytes each).

        Safe to run in the background: the new index is built outside the write lock (adds and removes
        go on meanwhile and stay in their own segments), then written beside the old one and swapped
        in by one commit, so a crash at any point leaves a whole state. Returns False (doing nothing)
        when another compaction of this index is running."""
        self._writable()
        with self._store.write_lock():
            snap = self._store.claim_compaction()
        if snap is None:
            log.info("%s: a compaction is already running", self.folder)
            return False
        try:
            from dinokit.retrieval.stream import can_compact_streamed, compact_streamed, live_ids

            budget = memory_budget or int(snap.meta.get("memory_budget") or DEFAULT_MEMORY_BUDGET)
            ids = live_ids(snap)
            if len(ids):
                kind, knobs = resolve_kind(snap.meta["kind"], self.dim, len(ids),
                                           dict(snap.meta.get("knobs") or {}), budget)
            else:  # nothing left to train on: an empty exact index until the next compaction
                kind, knobs = "flat", {}
            if can_compact_streamed(self._store, snap, kind, knobs):
                compact_streamed(self._store, snap, kind, knobs, ids)  # vectors never all in memory
                self._store.snapshot()
                return True
            x = _live_vectors(snap, ids)
            index = _reuse_or_build(snap, kind, knobs, ids, x)
            with self._store.write_lock():
                self._store.install_main(x, ids, index, kind, knobs, replaces=[s.name for s in snap.segments])
        except BaseException:
            with self._store.write_lock():
                self._store.release_claim()
            raise
        self._store.snapshot()
        return True

    def set_knobs(self, **knobs: Knob | None) -> None:
        """Change search-time knobs for later searches: ``ef_search`` (hnsw), ``nprobe``, ``k_factor`` (ivfpq)."""
        allowed = SEARCH_KNOBS.get(self.kind, frozenset())
        bad = sorted(set(knobs) - allowed)
        if bad:
            raise ValueError(f"{', '.join(bad)}: not a search knob of a {self.kind} index "
                             f"(valid: {', '.join(sorted(allowed)) or 'none'})")
        meta = self._meta
        main = {**(meta.get("main_knobs") or {}), **{k: v for k, v in knobs.items() if v is not None}}
        user = {**(meta.get("knobs") or {}), **{k: v for k, v in knobs.items() if v is not None}}
        with self._store.write_lock():
            self._store.set_meta({"main_knobs": main, "knobs": user})
        self._store.snapshot()

    def _writable(self) -> None:
        if self._origin is not None:
            raise PermissionError(f"{self._origin}: an index of the old format (version 1) opens read-only; "
                                  f"convert it with `dinokit index migrate {self._origin}`")
        if self._store.read_only:
            raise PermissionError(f"{self.folder}: index opened read-only")

    # ------------------------------------------------------------------ search

    def search(self, queries: Queries, k: int = 10, *, filter: Filter | None = None,
               model: nn.Module | None = None, feature_kind: str | None = None, ef_search: int | None = None,
               nprobe: int | None = None, k_factor: float | None = None, batch_size: int = 64,
               device: Device = None) -> SearchResult:
        """The ``k`` nearest stored items of each query, best first.

        ``queries``: vectors (N, D) or (D,) (numpy or torch), an ``Embeddings``, a PIL image or image
        path(s) (list). Images are embedded with ``model`` (default: the model given to :meth:`build`,
        else the source recorded in the index), which must be the model the index was built with.
        ``filter``: equality on metadata fields, several keys AND-ed (``{"sku": "b"}``), exact.
        ``feature_kind``: what kind of vectors are passed (checked when given).
        ``ef_search`` / ``nprobe`` / ``k_factor`` override the stored knobs for this call.
        """
        if feature_kind is not None and feature_kind != self.feature:
            raise ModelMismatchError(f"queries are {feature_kind!r} features but the index holds "
                                     f"{self.feature!r} features")
        x, names = self._query_vectors(queries, model=model, batch_size=batch_size, device=device)
        return self._search(x, k, filter, names, ef_search=ef_search, nprobe=nprobe, k_factor=k_factor)

    def search_vectors(self, vectors: Vectors, k: int = 10, *, filter: Filter | None = None,
                       **knobs: Knob | None) -> SearchResult:
        """Search with feature vectors (Q, D) or (D,) (normalized here)."""
        x = normalize(vectors)
        return self._search(x, k, filter, [str(i) for i in range(len(x))], **knobs)

    def search_by_id(self, id: int, k: int = 10, *, filter: Filter | None = None,
                     **knobs: Knob | None) -> SearchResult:
        """Search with the stored vector of item ``id`` (it finds itself first unless filtered out)."""
        return self._search(self.vector(id)[None, :], k, filter, [f"id {id}"], **knobs)

    def _search(self, x: np.ndarray, k: int, filter: Filter | None, names: list[str],
                **overrides: Knob | None) -> SearchResult:
        snap = self._store.snapshot()  # once per search: each call asks SQLite for the generation
        dim = int(snap.meta["dim"])
        if x.shape[1] != dim:
            raise ModelMismatchError(f"queries have dimension {x.shape[1]} but the index holds dimension "
                                     f"{dim} (another model?)")
        if k < 1:
            raise ValueError(f"k={k}: must be >= 1")
        allowed = self._store.filter_ids(dict(filter), snap) if filter else None
        k_eff = min(int(k), snap.count if allowed is None else len(allowed))
        if k_eff == 0:
            empty = np.zeros((len(x), 0))
            return SearchResult(empty.astype(np.int64), empty.astype(object), empty.astype(np.float32),
                                empty.astype(object), names)
        knobs = dict(snap.meta.get("main_knobs") or {})
        scores, ids = search_snapshot(snap, x, k_eff, allowed, knobs, **overrides)
        flat = ids.ravel().tolist()
        rows = self._store.items(flat, snap)
        paths = np.empty(len(flat), dtype=object)
        metas = np.empty(len(flat), dtype=object)
        for n, idx in enumerate(flat):  # plain ints: a server runs this per query
            row = rows.get(idx)
            if row is not None:
                paths[n], metas[n] = row[0], row[1]
        scores[ids < 0] = np.nan
        return SearchResult(ids, paths.reshape(ids.shape), scores, metas.reshape(ids.shape), names)

    def _query_vectors(self, queries: Queries, *, model: nn.Module | None, batch_size: int,
                       device: Device) -> tuple[np.ndarray, list[str]]:
        """Queries -> (normalized (N, D) float32, names)."""
        if hasattr(queries, "features") and hasattr(queries, "paths"):  # an Embeddings object
            self._check_embeddings_info(getattr(queries, "info", None) or {})
            return normalize(queries.features), [str(p) for p in queries.paths]
        if isinstance(queries, np.ndarray) or _is_tensor(queries):
            x = normalize(queries)
            return x, [str(i) for i in range(len(x))]
        items = [queries] if isinstance(queries, (str, os.PathLike, Image.Image)) else list(queries)
        if not items:
            raise ValueError("no queries given")
        import torch  # the vision stack: see the note at the top

        from dinokit.data.images import load_rgb
        from dinokit.data.transforms import eval_transform
        from dinokit.embedding import embed

        model = self._model_for(model, "searching by image")
        self._check_model(model)
        images, names = [], []
        for i, q in enumerate(items):
            if isinstance(q, Image.Image):
                images.append(q)
                names.append(getattr(q, "filename", "") or f"image {i}")
            elif isinstance(q, (str, os.PathLike)):
                images.append(load_rgb(q))  # ImageError: "PATH: reason", one line
                names.append(os.fspath(q))
            else:
                raise TypeError(f"query {i}: expected an image path, a PIL image or vectors, got {type(q).__name__}")
        transform = eval_transform(model, self.image_size)
        batch = torch.stack([transform(im) for im in images])
        emb = embed(model, batch, batch_size=batch_size, device=device, num_workers=0, features=self.feature,
                    strict=True)
        return normalize(emb.features), names

    def _model_for(self, model: nn.Module | None, what: str) -> nn.Module:
        """``model``, else the build model, else the model recorded in the index (loaded once)."""
        if model is not None:
            return model
        if self.model is None:
            source = self.model_source
            if not source:
                name = (self.model_info or {}).get("name")
                raise ValueError(f"{what} needs model= (the model this index was built with"
                                 + (f": {name}" if name else "") + "; the index records no source to load it from)")
            from dinokit.hub import load as load_model  # the vision stack: see the note at the top

            log.info("loading the index's model %s", source)
            self.model = load_model(source)
        return self.model

    def _check_embeddings_info(self, info: dict[str, Any]) -> None:
        """Embeddings carry the model fingerprint and feature kind that made them: check both."""
        kind = info.get("features")
        if kind is not None and kind != self.feature:
            raise ModelMismatchError(f"queries are {kind!r} features but the index holds {self.feature!r} features")
        mine = self.model_info or {}
        fp, want = info.get("fingerprint"), mine.get("fingerprint")
        if fp and want and fp != want:
            raise ModelMismatchError(
                f"model mismatch: the index was built with {mine.get('name')} (fingerprint "
                f"{want}) but the query features come from {info.get('model')} (fingerprint {fp})")

    def _check_model(self, model: nn.Module) -> None:
        """Raise ModelMismatchError when ``model`` is not the model the index was built with."""
        mine = self.model_info or {}
        want = mine.get("fingerprint")
        if not want:
            return
        fp = self._fp_cache.get(id(model))
        if fp is None:
            from dinokit.models.backbone import fingerprint  # the vision stack: see the note at the top

            fp = fingerprint(model)
            self._fp_cache = {id(model): fp}
        if fp != want:
            from dinokit._modattr import pretrained_cfg  # imports torch: see the note at the top

            name = getattr(model, "dinokit_name", None) or pretrained_cfg(model).get("architecture", "?")
            raise ModelMismatchError(
                f"model mismatch: the index was built with {mine.get('name')} "
                f"(fingerprint {want}) but the queries use {name} (fingerprint {fp}); "
                "use the same model or rebuild the index")

    # ------------------------------------------------------------------ persistence

    def info(self) -> dict[str, Any]:
        """What the index holds: counts, kind, knobs, memory, model, feature kind, segments."""
        snap = self._store.snapshot()
        meta = snap.meta
        return {
            "format_version": FORMAT_VERSION if self._origin is None else 1,
            "folder": self._origin if self.folder is None else str(self.folder),
            "read_only": self.read_only or self._origin is not None,
            "count": snap.count,
            "ntotal": snap.ntotal,
            "removed_pending": len(snap.deleted),
            "small_segments": sum(s.role == "small" for s in snap.segments),
            "pending": self.pending,
            "dim": self.dim,
            "kind": self.kind,
            "requested_kind": meta["kind"],
            "knobs": self.knobs,
            "metric": "inner_product (cosine on L2-normalized features)",
            "feature": self.feature,
            "image_size": self.image_size,
            "root": self.root,
            "roots": [str(r) for r in self.roots],
            "model": self.model_info,
            "memory_budget": meta.get("memory_budget"),  # the budget a build from shards was given
            "bytes_per_vector": round(memory_per_vector(self.kind, self.dim, self.knobs), 1)
            if self.kind != "auto" else None,
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the index as a store in ``folder`` (replaced atomically; a no-op for its own folder)."""
        folder = Path(folder)
        own = self.folder
        if own is not None and folder.exists() and folder.resolve() == own.resolve():
            return folder
        if self.read_only or self._origin is not None:
            return write_folder(folder, self._store.copy_to)
        with self._store.write_lock():  # a consistent copy: no writer commits meanwhile
            return write_folder(folder, self._store.copy_to)

    def __repr__(self) -> str:
        name = (self.model_info or {}).get("name")
        where = f", folder={str(self.folder)!r}" if self.folder is not None else ""
        return f"Index(kind={self.kind!r}, count={len(self)}, dim={self.dim}, model={name!r}{where})"


# ---------------------------------------------------------------------------- helpers


def _settings(dim: int, kind: str, knobs: dict[str, Any], model_info: dict[str, Any] | None, feature: str,
              image_size: int | None, root: str | os.PathLike[str] | None) -> dict[str, Any]:
    root_s = None if root is None else _abs(root)
    return {"dim": int(dim), "kind": kind, "knobs": dict(knobs), "model": model_info, "feature": feature,
            "image_size": image_size, "root": root_s, "roots": [root_s] if root_s else [],
            "main_kind": None, "main_knobs": None, "metric": "inner_product", "normalized": True}


def _candidates(items: Any) -> tuple[list[Path], list[str]]:
    """The image files ``items`` (a folder, a path or paths) names, absolute, and their folders."""
    from dinokit.data.images import list_images  # the vision stack: see the note at the top

    if isinstance(items, (str, os.PathLike)) and Path(items).is_dir():
        return [Path(_abs(p)) for p in list_images(items)], [_abs(items)]
    single = isinstance(items, (str, os.PathLike))
    candidates = [Path(_abs(p)) for p in ([items] if single else items)]
    return candidates, sorted({str(p.parent) for p in candidates})


def _by_input(metadata: MetadataLike | None, inputs: Any) -> MetadataLike | None:
    """A metadata list given for input images (in input order) as a mapping absolute path -> dict, so
    that it stays aligned when some images are skipped; ``inputs()`` gives the absolute input paths."""
    if metadata is None or isinstance(metadata, (str, os.PathLike, Mapping)):
        return metadata
    rows, names = list(metadata), list(inputs())
    if len(rows) != len(names):
        raise ValueError(f"metadata has {len(rows)} entries for {len(names)} images "
                         "(one dict per image, in input order)")
    return {str(n): (m if m is not None else {}) for n, m in zip(names, rows, strict=True)}


def _metadata_rows(metadata: MetadataLike | None, keys: Sequence[str | None], raw: Sequence[str | None],
                   root: str | None) -> list[dict[str, Any]]:
    """One metadata dict per item: from a list (input order), a mapping or a file keyed by path.

    A mapping/file key matches an item's stored path, its path as given, or its absolute path."""
    n = len(keys)
    if metadata is None:
        return [{} for _ in range(n)]
    if isinstance(metadata, (str, os.PathLike)):
        metadata = read_metadata_file(metadata)
    if isinstance(metadata, Mapping):
        table = {_key(k, root): v for k, v in metadata.items()}
        out = []
        for key, given in zip(keys, raw, strict=True):
            m = None if key is None else table.get(key, metadata.get(given or "", None))
            out.append(check_metadata(m, str(given)))
        missing = sum(1 for key in keys if key is not None and key not in table)
        if missing:
            log.info("metadata: %d of %d item(s) have no row (stored with empty metadata)", missing, n)
        return out
    rows = list(metadata)
    if len(rows) != n:
        raise ValueError(f"metadata has {len(rows)} entries for {n} items (one dict per item, in input order)")
    return [check_metadata(m, f"item {i} ({raw[i]})") for i, m in enumerate(rows)]


def _live_vectors(snap: Any, ids: np.ndarray) -> np.ndarray:
    """Vectors float32 (N, D) of the sorted live ``ids`` of a snapshot, all in memory."""
    from dinokit.retrieval.stream import live_vectors

    return live_vectors(snap, ids)


def _reuse_or_build(snap: Any, kind: str, knobs: dict[str, Any], ids: np.ndarray, x: np.ndarray) -> Any:
    """The new main FAISS index: the old one extended when nothing in it was removed and its kind and
    knobs still hold (O(new) work), an IVF-PQ refilled with its trained quantizers after removals, or
    a fresh build."""
    main = snap.main
    # on-disk inverted lists are not copied through memory: rebuilt (into memory) instead
    if main is not None and main.kind == kind != "flat" and snap.meta.get("main_knobs") == knobs \
            and not knobs.get("ondisk"):
        removed = len(snap.deleted) and np.isin(main.ids, snap.deleted).any()
        index = faiss.deserialize_index(faiss.serialize_index(main.index))  # never mutate a live index
        if not removed:
            start = len(main.ids)  # main ids come first in id order: only newer small segments follow
            if start <= len(x) and np.array_equal(ids[:start], main.ids):
                if start < len(x):
                    index.add(x[start:])
                return index
        if kind == "ivfpq":
            index.reset()
            index.add(x)
            return index
    return build_faiss(kind, x, knobs)


def _is_tensor(x: Any) -> bool:
    # a torch tensor, recognized without importing torch
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _abs(path: str | os.PathLike[str]) -> str:
    # absolute and normalized, but symlinks kept: files under a symlinked folder stay "inside" it
    return os.path.abspath(os.fspath(path))


def _key(path: str | os.PathLike[str], root: str | None) -> str:
    """Stored form of a path: relative paths are taken as stored (relative to ``root``); absolute ones
    become relative to ``root`` when they lie inside it."""
    s = os.fspath(path)
    p = Path(s)
    if root is None or not p.is_absolute():
        return s if root is None else p.as_posix()
    try:
        return Path(_abs(p)).relative_to(root).as_posix()
    except ValueError:
        return _abs(p)


def _source_of(model: Any) -> str | None:
    """The source ``dinokit.load`` read ``model`` from; local paths made absolute."""
    src = getattr(model, "dinokit_name", None)
    if src is None:
        return None
    p = Path(src).expanduser()
    return str(p.resolve()) if p.exists() else str(src)


def _first_duplicate(keys: Sequence[str | None]) -> str | None:
    seen: set[str] = set()
    for k in keys:
        if k is None:
            continue
        if k in seen:
            return k
        seen.add(k)
    return None


def _match_path(reported: str, given: list[Path]) -> Path:
    """The absolute path among ``given`` that ``reported`` (absolute or a suffix of one) names."""
    p = Path(reported)
    if p.is_absolute():
        return p
    matches = [g for g in given if g.as_posix().endswith("/" + p.as_posix())]
    if len(matches) != 1:
        raise RuntimeError(f"{reported}: cannot match the embedded path to an input path")
    return matches[0]
