"""FAISS image search over DINO features: build, add, remove, search, save and load.

An :class:`Index` keeps a FAISS index of L2-normalized features (so inner product = cosine
similarity), the path of every vector, and what made the features: the model's identity
(name, fingerprint, preprocessing), the feature kind ("cls", ...) and the image size. Searching
with another model or feature kind than the one the index was built with is an error.

Kinds (``kind=``):

- ``"flat"``: exact search (``IndexFlatIP``), 4*D bytes per vector.
- ``"hnsw"``: graph search (``IndexHNSWFlat``, inner product); knobs ``M`` (32), ``ef_construction``
  (40), ``ef_search`` (64, the speed/recall dial at search time). ~4*D + 8*M bytes per vector.
- ``"ivfpq"``: inverted lists of 4-bit product-quantized codes scanned with SIMD (``IndexIVFPQFastScan``,
  2x the queries/s of 8-bit IVF-PQ at the same recall here), re-ranked exactly (inside
  ``IndexRefineFlat``); knobs ``nlist`` (~sqrt(N)), ``pq_m`` (D/4 sub-quantizers: D/8 bytes per code),
  ``nprobe`` (16) and ``k_factor`` (candidates re-ranked per wanted result, 32); ``refine="flat"``
  keeps float32 vectors for the re-rank, ``refine="sq8"`` keeps 8-bit ones (4x smaller).
- ``"auto"``: see :func:`choose_kind`.

Removal marks vectors as deleted and filters them out with a FAISS ID selector at search time;
once more than a quarter of the index is deleted it is rebuilt from the stored vectors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinokit._io import atomic_path
from dinokit._types import Progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("flat", "hnsw", "ivfpq")
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
PATHS_FILE = "paths.json"

# choose_kind thresholds (documented in its docstring)
FLAT_MAX = 20_000
# measured (benchmarks/RESULTS.md, 384-d, 2 cores): at 100k HNSW beats IVF-PQ (recall 0.996 at 4.3k q/s);
# at 1M the HNSW graph takes 9x longer to build than IVF-PQ and falls to recall 0.86-0.94
HNSW_MAX = 250_000
DEFAULT_MEMORY_BUDGET = 8 * 2**30

_COMPACT_FRACTION = 0.25



class ModelMismatchError(ValueError):
    """Queries embedded with another model (or feature kind) than the one the index was built with."""


@dataclass(frozen=True)
class SearchResult:
    """The k nearest neighbours of each query, best first.

    ``paths``: object array (n_queries, k) of stored paths (None where fewer than k results);
    ``scores``: float32 (n_queries, k) cosine similarities (NaN where missing);
    ``ids``: int64 (n_queries, k) positions in the index (-1 where missing).
    """

    paths: np.ndarray
    scores: np.ndarray
    ids: np.ndarray
    query_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready: one dict per query with its name (if known) and its results."""
        rows = []
        for i in range(len(self)):
            results = [
                {"rank": r + 1, "path": p, "score": float(s), "id": int(j)}
                for r, (p, s, j) in enumerate(zip(self.paths[i], self.scores[i], self.ids[i], strict=True))
                if j >= 0
            ]
            name = self.query_names[i] if i < len(self.query_names) else str(i)
            rows.append({"query": name, "results": results})
        return rows


# ---------------------------------------------------------------------------- kind choice and faiss indexes


def memory_per_vector(kind: str, dim: int, knobs: dict[str, Any] | None = None) -> float:
    """Approximate bytes per stored vector for ``kind`` with ``knobs`` (ids and path list not counted)."""
    knobs = {**default_knobs(kind, dim, 1_000_000), **(knobs or {})}
    if kind == "flat":
        return 4.0 * dim
    if kind == "hnsw":
        # level-0 links: 2*M int32; upper levels add ~1/M of that on average
        return 4.0 * dim + 2 * knobs["M"] * 4 * (1 + 1 / knobs["M"])
    if kind == "ivfpq":
        code = knobs["pq_m"] * 4 / 8
        refine = 4.0 * dim if knobs["refine"] == "flat" else float(dim)
        return code + 8 + refine  # code + stored id + re-rank copy
    raise ValueError(f"unknown index kind {kind!r}: expected one of {', '.join(KINDS)} or auto")


def choose_kind(n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> tuple[str, dict[str, Any]]:
    """The automatic choice (``kind="auto"``), in the spirit of autofaiss: returns (kind, knobs).

    - n < 20,000: ``flat``. Exact search over so few vectors already takes about a millisecond.
    - n <= 250,000 and the HNSW graph (~4*D + 8*M bytes per vector) fits in ``memory_budget``:
      ``hnsw`` (best speed/recall at this size, no training).
    - otherwise ``ivfpq`` with an exact float32 re-rank if the vectors fit in the budget, else with an
      8-bit re-rank (``refine="sq8"``, ~D + D/8 bytes per vector). Past a few hundred thousand
      vectors an HNSW graph builds slowly on few cores and loses recall (measured at 1M: 11 min,
      recall@10 0.94 at efSearch 128, against 73 s and 0.98 for IVF-PQ at 0.6 ms per query).
    """
    if n < FLAT_MAX:
        return "flat", {}
    if n <= HNSW_MAX and n * memory_per_vector("hnsw", dim) <= memory_budget:
        return "hnsw", {}
    refine = "flat" if n * memory_per_vector("ivfpq", dim, {"refine": "flat"}) <= memory_budget else "sq8"
    return "ivfpq", {"refine": refine}


def _largest_divisor_at_most(d: int, limit: int) -> int:
    return max(m for m in range(1, max(1, limit) + 1) if d % m == 0)


def default_knobs(kind: str, dim: int, n: int) -> dict[str, Any]:
    """Default knobs for ``kind`` given the dimension and the number of training vectors ``n``."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 40, "ef_search": 64}
    if kind == "ivfpq":
        # nlist ~ sqrt(n) (a power of two), at least 39 training points per list
        nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
        nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))
        # measured at 1M (benchmarks/RESULTS.md): the PQ shortlist, not nprobe, limits recall, so a
        # generous re-rank (k_factor 32) buys recall cheaply; nprobe 16 leaves margin for real data
        return {"nlist": int(nlist), "pq_m": _largest_divisor_at_most(dim, max(1, dim // 4)),
                "nprobe": 16, "k_factor": 32, "refine": "flat"}
    raise ValueError(f"unknown index kind {kind!r}: expected one of {', '.join(KINDS)} or auto")


def _new_faiss_index(kind: str, dim: int, knobs: dict[str, Any]) -> Any:
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(knobs["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(knobs["ef_construction"])
        index.hnsw.efSearch = int(knobs["ef_search"])
        return index
    if kind == "ivfpq":
        quantizer = faiss.IndexFlatIP(dim)
        # 4-bit codes (16 centroids per sub-quantizer): trains on any collection size and is scanned
        # with SIMD lookups; the exact re-rank recovers what the coarse codes lose
        base = faiss.IndexIVFPQFastScan(quantizer, dim, int(knobs["nlist"]), int(knobs["pq_m"]), 4,
                                        faiss.METRIC_INNER_PRODUCT)
        base.own_fields = True
        quantizer.this.disown()  # the IVF index owns (and frees) its quantizer now
        # k-means subsamples to 64 points per centroid (faiss default 256): 4x faster training
        base.cp.max_points_per_centroid = 64
        base.nprobe = int(knobs["nprobe"])
        if knobs["refine"] == "flat":
            index = faiss.IndexRefineFlat(base)
        elif knobs["refine"] == "sq8":
            refine = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            index = faiss.IndexRefine(base, refine)
            refine.this.disown()
            index.own_refine_index = True
        else:
            raise ValueError(f"refine={knobs['refine']!r}: expected 'flat' or 'sq8'")
        base.this.disown()
        index.own_fields = True
        index.k_factor = float(knobs["k_factor"])
        return index
    raise ValueError(f"unknown index kind {kind!r}: expected one of {', '.join(KINDS)} or auto")


def _train_sample(x: np.ndarray, knobs: dict[str, Any], seed: int = 0) -> np.ndarray:
    # k-means quality saturates long before 256 points per list; 64 keeps 1M-vector builds fast
    n_train = min(len(x), max(64 * int(knobs["nlist"]), 256 * 64))
    if n_train >= len(x):
        return x
    rng = np.random.default_rng(seed)
    return x[np.sort(rng.choice(len(x), n_train, replace=False))]


def set_num_threads(n: int) -> None:
    """Number of OpenMP threads FAISS uses for building and searching (process-wide FAISS setting)."""
    import faiss

    if n < 1:
        raise ValueError(f"threads={n}: must be >= 1")
    faiss.omp_set_num_threads(int(n))


def normalize(features: Any) -> np.ndarray:
    """(N, D) float32 C-contiguous copy with unit-norm rows (zero rows stay zero)."""
    try:
        import torch

        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    x = np.array(features, dtype=np.float32, copy=True, order="C")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


# ---------------------------------------------------------------------------- the Index


class Index:
    """A FAISS index of L2-normalized image features with their paths and the model that made them.

    Create with :meth:`build` (a folder + a model), :meth:`from_features` or :meth:`load`.
    """

    def __init__(self, faiss_index: Any, paths: list[str | None], *, kind: str, knobs: dict[str, Any],
                 dim: int, feature_kind: str = "cls", model_identity: dict[str, Any] | None = None,
                 root: str | None = None, image_size: int | None = None,
                 model_source: str | None = None) -> None:
        if faiss_index.ntotal != len(paths):
            raise ValueError(f"index holds {faiss_index.ntotal} vectors but {len(paths)} paths were given")
        self._index = faiss_index
        self._paths: list[str | None] = list(paths)
        self._pos: dict[str, int] = {p: i for i, p in enumerate(self._paths) if p is not None}
        self.kind = kind
        self.knobs = dict(knobs)
        self.dim = int(dim)
        self.feature_kind = feature_kind
        self.model_identity = dict(model_identity) if model_identity else None
        self.root = root
        self.image_size = image_size
        # how to load the model again (registry name, absolute path, HF repo id), for the CLI
        self.model_source = model_source
        self._model_fp_cache: dict[int, str] = {}
        # the model that embeds image queries when search/add get no model= (set by build; not saved)
        self.model: Any = None
        self._dead: np.ndarray | None = None  # positions of removed vectors, cached for the selector

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_features(cls, features: Any, paths: Sequence[str | os.PathLike[str]], kind: str = "auto", *,
                      model_identity: dict[str, Any] | None = None, feature_kind: str = "cls",
                      root: str | os.PathLike[str] | None = None, image_size: int | None = None,
                      model_source: str | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                      **knobs: Any) -> Index:
        """An index of ``features`` (N, D) with their ``paths`` (N,).

        ``kind``: "flat" | "hnsw" | "ivfpq" | "auto"; ``knobs`` override the kind's defaults
        (e.g. ``M=16, ef_search=128`` or ``nlist=1024, nprobe=8, refine="sq8"``). Duplicate paths
        are an error. Features are L2-normalized, so scores are cosine similarities.
        """
        x = normalize(features)
        keys = [str(p) if not isinstance(p, os.PathLike) else os.fspath(p) for p in paths]
        if len(keys) != len(x):
            raise ValueError(f"{len(x)} feature rows but {len(keys)} paths")
        if len(x) == 0:
            raise ValueError("cannot build an index from zero vectors")
        dup = _first_duplicate(keys)
        if dup is not None:
            raise ValueError(f"{dup}: path given twice")
        dim = x.shape[1]
        if kind == "auto":
            kind, auto_knobs = choose_kind(len(x), dim, memory_budget)
            knobs = {**auto_knobs, **knobs}
            log.info("kind=auto chose %s for %d vectors of dim %d", kind, len(x), dim)
        defaults = default_knobs(kind, dim, len(x))
        unknown = sorted(set(knobs) - set(defaults))
        if unknown:
            raise ValueError(f"unknown knob(s) for kind {kind!r}: {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(defaults)) or 'none'}")
        knobs = {**defaults, **knobs}
        if kind == "ivfpq" and dim % int(knobs["pq_m"]) != 0:
            raise ValueError(f"pq_m={knobs['pq_m']} must divide the feature dimension {dim}")
        index = _new_faiss_index(kind, dim, knobs)
        if len(x) >= 100_000:  # minutes on a few cores: say what is happening
            log.info("building a %s index over %d vectors (%s)", kind, len(x),
                     ", ".join(f"{k}={v}" for k, v in knobs.items()) or "exact")
        if not index.is_trained:
            index.train(_train_sample(x, knobs))
        index.add(x)
        return cls(index, keys, kind=kind, knobs=knobs, dim=dim, feature_kind=feature_kind,
                   model_identity=model_identity, root=None if root is None else _abs(root),
                   image_size=image_size, model_source=model_source)

    @classmethod
    def build(cls, folder: str | os.PathLike[str], model: Any, kind: str = "auto", *, batch_size: int = 64,
              device: Any = None, num_workers: int | None = None, image_size: int | None = None,
              feature_kind: str = "cls", progress: Progress | None = None, model_source: str | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET, **knobs: Any) -> Index:
        """Embed every image under ``folder`` with ``model`` and index them (paths relative to ``folder``).

        Unreadable images are skipped and logged (see ``dinokit.embed``). ``model_source`` (how to load
        the model again) defaults to the source ``dinokit.load`` was given, made absolute for local paths.
        """
        from dinokit.models.backbone import identity

        emb = _embed_folder(model, folder, batch_size=batch_size, device=device, num_workers=num_workers,
                            image_size=image_size, feature_kind=feature_kind, progress=progress)
        if len(emb.paths) == 0:
            raise ValueError(f"{folder}: no usable images to index")
        index = cls.from_features(emb.features, emb.paths, kind, model_identity=identity(model),
                                  feature_kind=feature_kind, root=folder,
                                  image_size=emb.info.get("image_size") or image_size,
                                  model_source=model_source or _source_of(model), memory_budget=memory_budget,
                                  **knobs)
        index.model = model  # later searches by image need no model= (a loaded index does)
        return index

    # ------------------------------------------------------------------ content

    def __len__(self) -> int:
        """Number of live (not removed) vectors."""
        return len(self._pos)

    @property
    def ntotal(self) -> int:
        """Vectors stored in the FAISS index, removed ones included until the next compaction."""
        return int(self._index.ntotal)

    @property
    def paths(self) -> list[str]:
        """The live paths, in index order."""
        return [p for p in self._paths if p is not None]

    def __contains__(self, path: object) -> bool:
        return self._key(path) in self._pos if isinstance(path, (str, os.PathLike)) else False

    def resolve(self, path: str) -> Path:
        """The file a stored path points to (joined to the indexed folder for relative paths)."""
        p = Path(path)
        return p if p.is_absolute() or self.root is None else Path(self.root) / p

    def _key(self, path: str | os.PathLike[str]) -> str:
        """Stored form of a path: relative paths are taken as stored (relative to the indexed folder);
        absolute ones become relative to it when they lie inside it."""
        s = os.fspath(path)
        p = Path(s)
        if self.root is None or not p.is_absolute():
            return s if self.root is None else p.as_posix()
        try:
            return Path(_abs(p)).relative_to(self.root).as_posix()
        except ValueError:
            return _abs(p)

    def vectors(self, paths: Iterable[str] | None = None) -> np.ndarray:
        """Stored (normalized) vectors (N, D) of ``paths`` (all live ones by default), float32."""
        keys = self.paths if paths is None else [self._key(p) for p in paths]
        missing = [k for k in keys if k not in self._pos]
        if missing:
            raise KeyError(f"{missing[0]}: not in the index")
        ids = np.array([self._pos[k] for k in keys], dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._index.reconstruct(int(i)) for i in ids]) if len(ids) < 64 else \
            self._index.reconstruct_n(0, self.ntotal)[ids]

    # ------------------------------------------------------------------ add / remove

    def add(self, items: Any = None, *, features: Any = None, paths: Sequence[str] | None = None,
            model: Any = None, batch_size: int = 64, device: Any = None, num_workers: int | None = None,
            progress: Progress | None = None) -> int:
        """Add images or vectors; paths already in the index are skipped. Returns how many were added.

        ``items``: a folder (every image under it) or a list of image paths, embedded with ``model``
        (which must be the model the index was built with). Or ``features`` (N, D) with ``paths``.
        """
        if features is not None:
            if paths is None:
                raise ValueError("add(features=...) needs paths=")
            keys = [self._key(p) for p in paths]
            x = normalize(features)
            if len(keys) != len(x):
                raise ValueError(f"{len(x)} feature rows but {len(keys)} paths")
        else:
            if items is None:
                raise ValueError("add() needs a folder, image paths, or features= and paths=")
            model = model if model is not None else self.model
            if model is None:
                raise ValueError("add(folder) needs model= (the model this index was built with)")
            self._check_model(model)
            if isinstance(items, (str, os.PathLike)) and Path(items).is_dir():
                from dinokit.data.images import list_images

                candidates = [Path(_abs(p)) for p in list_images(items)]
            else:
                single = isinstance(items, (str, os.PathLike))
                candidates = [Path(_abs(p)) for p in ([items] if single else items)]
            todo = [p for p in candidates if self._key(p) not in self._pos]
            if not todo:
                return 0
            emb = _embed_paths(model, todo, batch_size=batch_size, device=device, num_workers=num_workers,
                               image_size=self.image_size, feature_kind=self.feature_kind, progress=progress)
            # embed reports paths relative to the common folder or as given; map back to our absolute ones
            keys = [self._key(_match_path(p, todo)) for p in emb.paths]
            x = normalize(emb.features) if len(keys) else np.zeros((0, self.dim), np.float32)
        if x.shape[1:] != (self.dim,) and len(x):
            raise ValueError(f"features have dimension {x.shape[1]}, the index holds dimension {self.dim}")
        keep, seen = [], set()
        for i, k in enumerate(keys):
            if k in self._pos or k in seen:
                continue
            seen.add(k)
            keep.append(i)
        if len(keep) < len(keys):
            log.info("add: %d path(s) already in the index were skipped", len(keys) - len(keep))
        if not keep:
            return 0
        start = self.ntotal
        self._index.add(np.ascontiguousarray(x[keep]))
        for j, i in enumerate(keep):
            self._paths.append(keys[i])
            self._pos[keys[i]] = start + j
        return len(keep)

    def remove(self, paths: Iterable[str | os.PathLike[str]]) -> int:
        """Remove ``paths`` (unknown ones are ignored); returns how many were removed."""
        n = 0
        for p in paths:
            pos = self._pos.pop(self._key(p), None)
            if pos is not None:
                self._paths[pos] = None
                n += 1
        if n and self.ntotal - len(self) > _COMPACT_FRACTION * self.ntotal:
            self.compact()
        return n

    def compact(self) -> None:
        """Rebuild the FAISS index without the removed vectors (IVF-PQ keeps its trained quantizers)."""
        import faiss

        alive = np.array([i for i, p in enumerate(self._paths) if p is not None], dtype=np.int64)
        x = self._index.reconstruct_n(0, self.ntotal)[alive] if self.ntotal else np.zeros((0, self.dim), "float32")
        if self.kind == "ivfpq":
            index = faiss.clone_index(self._index)
            index.reset()
        else:
            index = _new_faiss_index(self.kind, self.dim, self.knobs)
        if len(x):
            index.add(np.ascontiguousarray(x))
        self._index = index
        self._dead = None
        self._paths = [self._paths[i] for i in alive]
        self._pos = {p: i for i, p in enumerate(self._paths) if p is not None}

    # ------------------------------------------------------------------ search

    def set_knobs(self, **knobs: Any) -> None:
        """Change search-time knobs for later searches: ``ef_search`` (hnsw), ``nprobe``, ``k_factor`` (ivfpq)."""
        allowed = {"hnsw": {"ef_search"}, "ivfpq": {"nprobe", "k_factor"}}.get(self.kind, set())
        bad = sorted(set(knobs) - allowed)
        if bad:
            raise ValueError(f"{', '.join(bad)}: not a search knob of a {self.kind} index "
                             f"(valid: {', '.join(sorted(allowed)) or 'none'})")
        for k, v in knobs.items():
            if v is not None:
                self.knobs[k] = v

    def search(self, queries: Any, k: int = 10, *, model: Any = None, feature_kind: str | None = None,
               ef_search: int | None = None, nprobe: int | None = None, k_factor: float | None = None,
               batch_size: int = 64, device: Any = None) -> SearchResult:
        """The ``k`` nearest stored images of each query, best first.

        ``queries``: vectors (N, D) or (D,) (numpy or torch), a PIL image or list of them, or image
        path(s); images are embedded with ``model`` (default: the model given to :meth:`build`; a
        loaded index needs it passed), which must be the one the index was built with (fingerprint).
        ``feature_kind``: what kind of vectors are passed (checked against the index when given).
        ``ef_search`` / ``nprobe`` / ``k_factor`` override the stored knobs for this call.
        """
        if feature_kind is not None and feature_kind != self.feature_kind:
            raise ModelMismatchError(f"queries are {feature_kind!r} features but the index holds "
                                     f"{self.feature_kind!r} features")
        x, names = self._query_vectors(queries, model=model, batch_size=batch_size, device=device)
        if x.shape[1] != self.dim:
            raise ModelMismatchError(f"queries have dimension {x.shape[1]} but the index holds dimension "
                                     f"{self.dim} (another model?)")
        if k < 1:
            raise ValueError(f"k={k}: must be >= 1")
        n_q = len(x)
        k_eff = min(int(k), len(self))
        if k_eff == 0:
            return SearchResult(np.full((n_q, 0), None, object), np.zeros((n_q, 0), np.float32),
                                np.zeros((n_q, 0), np.int64), names)
        scores, ids = self._faiss_search(x, k_eff, ef_search=ef_search, nprobe=nprobe, k_factor=k_factor)
        scores = scores.astype(np.float32)
        scores[ids < 0] = np.nan
        paths = np.empty(ids.shape, dtype=object)
        for (i, j), idx in np.ndenumerate(ids):
            paths[i, j] = self._paths[idx] if idx >= 0 else None
        return SearchResult(paths, scores, ids.astype(np.int64), names)

    def _faiss_search(self, x: np.ndarray, k: int, *, ef_search: int | None, nprobe: int | None,
                      k_factor: float | None) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        deleted = self.ntotal - len(self)
        sel = batch_sel = None
        if deleted:
            # keep both selectors referenced: the Not selector only holds a raw pointer to the batch
            if self._dead is None or len(self._dead) != deleted:  # rebuilt only after a removal
                self._dead = np.array([i for i, p in enumerate(self._paths) if p is None], dtype=np.int64)
            batch_sel = faiss.IDSelectorBatch(self._dead)
            sel = faiss.IDSelectorNot(batch_sel)
        if self.kind == "flat":
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=int(ef_search or self.knobs["ef_search"]))
            if sel is not None:
                params.sel = sel
        else:
            base = faiss.SearchParametersIVF(nprobe=int(nprobe or self.knobs["nprobe"]))
            if sel is not None:
                base.sel = sel
            params = faiss.IndexRefineSearchParameters(k_factor=float(k_factor or self.knobs["k_factor"]),
                                                       base_index_params=base)
        scores, ids = self._index.search(x, k, params=params)
        del batch_sel  # only now may the selector be freed
        return scores, ids

    def _query_vectors(self, queries: Any, *, model: Any, batch_size: int, device: Any
                       ) -> tuple[np.ndarray, list[str]]:
        """Queries -> (normalized (N, D) float32, names)."""
        from PIL import Image

        if hasattr(queries, "features") and hasattr(queries, "paths"):  # an Embeddings object
            self._check_embeddings_info(getattr(queries, "info", None) or {})
            return normalize(queries.features), [str(p) for p in queries.paths]
        if _is_array(queries):
            x = normalize(queries)
            return x, [str(i) for i in range(len(x))]
        items = [queries] if isinstance(queries, (str, os.PathLike, Image.Image)) else list(queries)
        if not items:
            raise ValueError("no queries given")
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("searching by image needs model= (the model this index was built with"
                             + (f": {self.model_identity.get('name')}" if self.model_identity else "") + ")")
        self._check_model(model)
        from dinokit.data.images import load_rgb

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
        feats = _embed_images(model, images, batch_size=batch_size, device=device,
                              image_size=self.image_size, feature_kind=self.feature_kind)
        return normalize(feats), names

    def _check_embeddings_info(self, info: dict[str, Any]) -> None:
        """Embeddings carry the model fingerprint and feature kind that made them: check both."""
        kind = info.get("features")
        if kind is not None and kind != self.feature_kind:
            raise ModelMismatchError(f"queries are {kind!r} features but the index holds "
                                     f"{self.feature_kind!r} features")
        fp, want = info.get("fingerprint"), (self.model_identity or {}).get("fingerprint")
        if fp and want and fp != want:
            raise ModelMismatchError(
                f"model mismatch: the index was built with {self.model_identity.get('name')} (fingerprint "
                f"{want}) but the query features come from {info.get('model')} (fingerprint {fp})")

    def _check_model(self, model: Any) -> None:
        """Raise ModelMismatchError when ``model`` is not the model the index was built with."""
        if not self.model_identity or not self.model_identity.get("fingerprint"):
            return
        from dinokit.models.backbone import fingerprint

        fp = self._model_fp_cache.get(id(model))
        if fp is None:
            fp = fingerprint(model)
            self._model_fp_cache = {id(model): fp}
        want = self.model_identity["fingerprint"]
        if fp != want:
            name = getattr(model, "dinokit_name", None) or model.pretrained_cfg.get("architecture", "?")
            raise ModelMismatchError(
                f"model mismatch: the index was built with {self.model_identity.get('name')} "
                f"(fingerprint {want}) but the queries use {name} (fingerprint {fp}); "
                "use the same model or rebuild the index")

    # ------------------------------------------------------------------ persistence

    def info(self) -> dict[str, Any]:
        """What the index holds: counts, kind, knobs, memory, model, feature kind."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "knobs": self.knobs,
            "count": len(self),
            "ntotal": self.ntotal,
            "removed_pending": self.ntotal - len(self),
            "dim": self.dim,
            "metric": "inner_product (cosine on L2-normalized features)",
            "feature_kind": self.feature_kind,
            "image_size": self.image_size,
            "root": self.root,
            "model": self.model_identity,
            "model_source": self.model_source,
            "bytes_per_vector": round(memory_per_vector(self.kind, self.dim, self.knobs), 1),
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``folder/{index.faiss, meta.json, paths.json}``; the folder is replaced atomically."""
        import faiss

        folder = Path(folder)
        check_index_target(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in self.info().items() if k not in ("metric", "bytes_per_vector")}
        meta["metric"] = "inner_product"
        meta["normalized"] = True
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            (tmp / PATHS_FILE).write_text(json.dumps(self._paths))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if folder.exists():
                # two renames: the old folder is only deleted once the new one is in place
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
                os.replace(folder, old / "index")
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Index:
        """Read an index written by :meth:`save`."""
        import faiss

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such index folder")
        for name in (INDEX_FILE, META_FILE, PATHS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing (not a dinokit index folder?)")
        try:
            meta = json.loads((folder / META_FILE).read_text())
            paths = json.loads((folder / PATHS_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{folder}: corrupt index metadata ({e})") from e
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{folder / META_FILE}: index format version {version!r} is not supported "
                             f"(this dinokit reads versions <= {FORMAT_VERSION})")
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as e:
            raise ValueError(f"{folder / INDEX_FILE}: cannot read FAISS index ({str(e).splitlines()[-1]})") from e
        if index.ntotal != len(paths):
            raise ValueError(f"{folder}: corrupt index ({index.ntotal} vectors but {len(paths)} paths)")
        return cls(index, paths, kind=meta["kind"], knobs=meta.get("knobs", {}), dim=int(meta["dim"]),
                   feature_kind=meta.get("feature_kind", "cls"), model_identity=meta.get("model"),
                   root=meta.get("root"), image_size=meta.get("image_size"),
                   model_source=meta.get("model_source"))

    def __repr__(self) -> str:
        name = (self.model_identity or {}).get("name")
        return f"Index(kind={self.kind!r}, count={len(self)}, dim={self.dim}, model={name!r})"


# ---------------------------------------------------------------------------- helpers


def _abs(path: str | os.PathLike[str]) -> str:
    # absolute and normalized, but symlinks kept: files under a symlinked folder stay "inside" it
    return os.path.abspath(os.fspath(path))


def check_index_target(folder: str | os.PathLike[str]) -> None:
    """Raise FileExistsError unless ``folder`` is absent, empty or an index (which ``save`` replaces).

    Saving replaces the whole folder, so this guards e.g. the image folder itself from deletion."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / META_FILE).is_file())):
        raise FileExistsError(f"{folder}: exists and is not a dinokit index folder; refusing to replace it")


def _source_of(model: Any) -> str | None:
    """The source ``dinokit.load`` read ``model`` from; local paths made absolute."""
    src = getattr(model, "dinokit_name", None)
    if src is None:
        return None
    p = Path(src).expanduser()
    return str(p.resolve()) if p.exists() else str(src)


def _first_duplicate(keys: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for k in keys:
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


def _is_array(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return True
    try:
        import torch

        return isinstance(x, torch.Tensor)
    except ImportError:  # pragma: no cover
        return False


def _embed_folder(model: Any, folder: Any, **kw: Any) -> Any:
    import dinokit

    return dinokit.embed(model, folder, batch_size=kw["batch_size"], device=kw["device"],
                         num_workers=kw["num_workers"], image_size=kw["image_size"],
                         features=kw["feature_kind"], progress=kw["progress"])


def _embed_paths(model: Any, paths: list[Path], **kw: Any) -> Any:
    import dinokit

    return dinokit.embed(model, [str(p) for p in paths], batch_size=kw["batch_size"], device=kw["device"],
                         num_workers=kw["num_workers"], image_size=kw["image_size"],
                         features=kw["feature_kind"], progress=kw["progress"])


def _embed_images(model: Any, images: list[Any], **kw: Any) -> Any:
    """PIL images -> features (N, D), with the same eval preprocessing and feature code as ``embed``."""
    import torch

    import dinokit
    from dinokit.data.transforms import eval_transform

    transform = eval_transform(model, kw["image_size"])
    x = torch.stack([transform(im) for im in images])
    emb = dinokit.embed(model, x, batch_size=kw["batch_size"], device=kw["device"], num_workers=0,
                        features=kw["feature_kind"], strict=True)
    return emb.features


# ---------------------------------------------------------------------------- contact sheet


def contact_sheet(result: SearchResult, queries: Sequence[Any], out_path: str | os.PathLike[str], *,
                  index: Index | None = None, thumb: int = 128) -> Path:
    """A PNG with one row per query: the query image, then its results with rank and score.

    ``queries``: the query images (paths or PIL images), in the order searched. Result paths are
    opened through ``index.resolve`` (relative to the indexed folder); missing files are drawn grey.
    """
    from PIL import Image, ImageDraw, ImageFont

    from dinokit.data.images import ImageError, load_rgb

    font = ImageFont.load_default()
    pad, caption = 6, 16
    k = result.paths.shape[1] if result.paths.ndim == 2 else 0
    cell_w, cell_h = thumb + pad, thumb + caption + pad
    sheet = Image.new("RGB", (pad + (k + 1) * cell_w + pad, pad + max(1, len(result)) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)

    def tile(src: Any) -> Image.Image | None:
        try:
            img = src if isinstance(src, Image.Image) else load_rgb(src)
        except ImageError as e:
            log.warning("contact sheet: %s", e)
            return None
        img = img.convert("RGB")
        # fit the longer side to the cell, up or down (small images would otherwise be specks)
        scale = thumb / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        return img.resize(size, Image.LANCZOS if scale < 1 else Image.NEAREST)

    def put(img: Image.Image | None, col: int, row: int, text: str, color: str) -> None:
        x, y = pad + col * cell_w + (pad if col else 0), pad + row * cell_h
        if img is None:
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(200, 200, 200))
            draw.text((x + 4, y + thumb // 2 - 6), "missing", fill="black", font=font)
        else:
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        draw.text((x, y + thumb + 2), text, fill=color, font=font)

    for i in range(len(result)):
        q = queries[i] if i < len(queries) else None
        name = Path(q).name if isinstance(q, (str, os.PathLike)) else "query"
        put(tile(q) if q is not None else None, 0, i, f"query: {name}"[:24], "blue")
        for j in range(k):
            p = result.paths[i, j]
            if p is None:
                continue
            src = index.resolve(p) if index is not None else Path(p)
            put(tile(src), j + 1, i, f"{j + 1}. {result.scores[i, j]:.3f}", "black")
    out = Path(out_path)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out
