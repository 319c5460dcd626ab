"""FAISS index kinds: the automatic choice, default knobs, memory per vector, building and searching.

Kinds (``kind=``):

- ``"flat"``: exact search (``IndexFlatIP``), 4*D bytes per vector.
- ``"hnsw"``: graph search (``IndexHNSWFlat``, inner product); knobs ``M`` (32), ``ef_construction``
  (40), ``ef_search`` (64, the speed/recall dial at search time). ~4*D + 8*M bytes per vector.
- ``"ivfpq"``: inverted lists of 4-bit product-quantized codes scanned with SIMD (``IndexIVFPQFastScan``,
  2x the queries/s of 8-bit IVF-PQ at the same recall here), re-ranked exactly (inside
  ``IndexRefineFlat``); knobs ``nlist`` (~sqrt(N)), ``pq_m`` (D/4 sub-quantizers: D/8 bytes per code),
  ``nprobe`` (16) and ``k_factor`` (candidates re-ranked per wanted result, 32); ``refine="flat"``
  keeps float32 vectors for the re-rank, ``refine="sq8"`` keeps 8-bit ones (4x smaller),
  ``refine="disk"`` keeps none in RAM: the bare ``IndexIVFPQFastScan`` returns ``k * k_factor``
  candidates and the search re-ranks them exactly from the store's float32 vector file (memory-mapped:
  only the candidate rows are read). ``ondisk`` (0/1): the inverted lists live in an ``.ivfdata`` file
  (faiss ``OnDiskInvertedLists``, 8-bit ``IndexIVFPQ`` codes, read through the page cache) for
  collections whose codes alone exceed the memory budget; it implies ``refine="disk"``.
- ``"auto"``: see :func:`choose_kind`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import faiss as _faiss_typed
import numpy as np

log = logging.getLogger(__name__)

# faiss's type stubs miss the SWIG keyword arguments, ownership helpers and several classes: use it untyped
faiss: Any = _faiss_typed

KINDS = ("flat", "hnsw", "ivfpq")

# choose_kind thresholds (documented in its docstring)
FLAT_MAX = 20_000
# measured (benchmarks/RESULTS.md, 384-d, 2 cores): at 100k HNSW beats IVF-PQ (recall 0.996 at 4.3k q/s);
# at 1M the HNSW graph takes 9x longer to build than IVF-PQ and falls to recall 0.86-0.94
HNSW_MAX = 250_000
DEFAULT_MEMORY_BUDGET = 8 * 2**30
#: one FAISS knob value: ``M=32``, ``nprobe=8``, ``k_factor=2.0``, ``refine="sq8"``, ...
Knob = int | float | str

SEARCH_KNOBS = {"flat": frozenset(), "hnsw": frozenset({"ef_search"}), "ivfpq": frozenset({"nprobe", "k_factor"})}


def memory_per_vector(kind: str, dim: int, knobs: dict[str, Any] | None = None) -> float:
    """Approximate bytes per stored vector for ``kind`` with ``knobs`` (ids and path list not counted)."""
    knobs = {**default_knobs(kind, dim, 1_000_000), **(knobs or {})}
    if kind == "flat":
        return 4.0 * dim
    if kind == "hnsw":
        # level-0 links: 2*M int32; upper levels add ~1/M of that on average
        return 4.0 * dim + 2 * knobs["M"] * 4 * (1 + 1 / knobs["M"])
    if kind == "ivfpq":
        if knobs.get("ondisk"):
            return 0.0  # codes and ids in the .ivfdata file, vectors in the .npy: the page cache holds them
        code = knobs["pq_m"] * 4 / 8
        refine = {"flat": 4.0 * dim, "sq8": float(dim), "disk": 0.0}[knobs["refine"]]
        return code + 8 + refine  # code + stored id + re-rank copy (none: re-ranked from the vector file)
    raise ValueError(f"unknown index kind {kind!r}: expected one of {', '.join(KINDS)} or auto")


def choose_kind(n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> tuple[str, dict[str, Any]]:
    """The automatic choice (``kind="auto"``), in the spirit of autofaiss: returns (kind, knobs).

    - n < 20,000: ``flat``. Exact search over so few vectors already takes about a millisecond.
    - n <= 250,000 and the HNSW graph (~4*D + 8*M bytes per vector) fits in ``memory_budget``:
      ``hnsw`` (best speed/recall at this size, no training).
    - otherwise ``ivfpq`` with an exact float32 re-rank if the vectors fit in the budget, else with an
      8-bit re-rank (``refine="sq8"``, ~D + D/8 bytes per vector) if that fits, else re-ranked from
      the vector file on disk (``refine="disk"``, D/8 + 8 bytes per vector), else with the inverted
      lists themselves on disk (``ondisk=1``, nothing per vector in RAM). Past a few hundred thousand
      vectors an HNSW graph builds slowly on few cores and loses recall (measured at 1M: 11 min,
      recall@10 0.94 at efSearch 128, against 73 s and 0.98 for IVF-PQ at 0.6 ms per query).
    """
    if n < FLAT_MAX:
        return "flat", {}
    if n <= HNSW_MAX and n * memory_per_vector("hnsw", dim) <= memory_budget:
        return "hnsw", {}
    return "ivfpq", ivfpq_layout(n, dim, memory_budget)


def ivfpq_layout(n: int, dim: int, memory_budget: int) -> dict[str, Any]:
    """The IVF-PQ re-rank copy (and list storage) that fits ``n`` vectors in ``memory_budget``: the
    first of refine flat, sq8, disk that fits, else disk with on-disk inverted lists."""
    for refine in ("flat", "sq8", "disk"):
        if n * memory_per_vector("ivfpq", dim, {"refine": refine}) <= memory_budget:
            return {"refine": refine}
    return {"refine": "disk", "ondisk": 1}


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
                "nprobe": 16, "k_factor": 32, "refine": "flat", "ondisk": 0}
    raise ValueError(f"unknown index kind {kind!r}: expected one of {', '.join(KINDS)} or auto")


def _new_faiss_index(kind: str, dim: int, knobs: dict[str, Any]) -> Any:
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(knobs["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(knobs["ef_construction"])
        index.hnsw.efSearch = int(knobs["ef_search"])
        return index
    if kind == "ivfpq" and knobs.get("ondisk"):
        # on-disk inverted lists hold plain (array) lists: 8-bit IVF-PQ, not the SIMD block layout
        quantizer = faiss.IndexFlatIP(dim)
        base = faiss.IndexIVFPQ(quantizer, dim, int(knobs["nlist"]), int(knobs["pq_m"]) // 2, 8,
                                faiss.METRIC_INNER_PRODUCT)
        base.own_fields = True
        quantizer.this.disown()
        base.cp.max_points_per_centroid = 64
        base.nprobe = int(knobs["nprobe"])
        return base
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
        if knobs["refine"] == "disk":  # the search re-ranks from the vector file (search.py)
            return base
        if knobs["refine"] == "flat":
            index = faiss.IndexRefineFlat(base)
        elif knobs["refine"] == "sq8":
            refine = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            index = faiss.IndexRefine(base, refine)
            refine.this.disown()
            index.own_refine_index = True
        else:
            raise ValueError(f"refine={knobs['refine']!r}: expected 'flat', 'sq8' or 'disk'")
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


@contextlib.contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints on stdout to stderr meanwhile: FAISS's on-disk inverted lists print
    notices with printf ("resizing FILE to N bytes"), which would corrupt ``--json`` output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # C stdio buffers what it printed to a pipe: out before the switch back
        os.dup2(saved, 1)
        os.close(saved)


def set_num_threads(n: int) -> None:
    """Number of OpenMP threads FAISS uses for building and searching (process-wide FAISS setting)."""
    if n < 1:
        raise ValueError(f"threads={n}: must be >= 1")
    faiss.omp_set_num_threads(int(n))


def normalize(features: Any, *, copy: bool = True) -> np.ndarray:
    """(N, D) float32 C-contiguous copy with unit-norm rows (zero rows stay zero). ``copy=False``
    normalizes a writable float32 C-contiguous array in place (no second copy of a large shard)."""
    if type(features).__module__.startswith("torch") and hasattr(features, "detach"):
        # a torch tensor (recognized without importing torch: vector-only processes never load it)
        features = features.detach().float().cpu().numpy()
    x = np.array(features, dtype=np.float32, copy=True, order="C") if copy else \
        np.require(features, np.float32, ["C", "W"])
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def resolve_kind(kind: str, dim: int, n: int, knobs: dict[str, Any],
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> tuple[str, dict[str, Any]]:
    """(kind, full knobs) for ``n`` vectors of dimension ``dim``: "auto" resolved, defaults filled in,
    unknown knobs rejected (ValueError naming them)."""
    if kind == "auto":
        kind, auto_knobs = choose_kind(n, dim, memory_budget)
        knobs = {**auto_knobs, **{k: v for k, v in knobs.items() if k in default_knobs(kind, dim, n)}}
        log.info("kind=auto chose %s for %d vectors of dim %d", kind, n, dim)
    elif kind == "ivfpq" and "refine" not in knobs and "ondisk" not in knobs:
        knobs = {**ivfpq_layout(n, dim, memory_budget), **knobs}  # the re-rank copy the budget allows
    defaults = default_knobs(kind, dim, n)
    unknown = sorted(set(knobs) - set(defaults))
    if unknown:
        raise ValueError(f"unknown knob(s) for kind {kind!r}: {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(defaults)) or 'none'}")
    knobs = {**defaults, **knobs}
    if kind == "ivfpq" and dim % int(knobs["pq_m"]) != 0:
        raise ValueError(f"pq_m={knobs['pq_m']} must divide the feature dimension {dim}")
    if kind == "ivfpq" and knobs["refine"] not in ("flat", "sq8", "disk"):
        raise ValueError(f"refine={knobs['refine']!r}: expected 'flat', 'sq8' or 'disk'")
    if kind == "ivfpq" and knobs.get("ondisk"):
        if int(knobs["pq_m"]) % 2:
            raise ValueError(f"ondisk=1 stores 8-bit codes of pq_m/2 sub-quantizers: pq_m={knobs['pq_m']} must be even")
        knobs["refine"] = "disk"
    return kind, knobs


def check_kind(kind: str) -> None:
    """ValueError unless ``kind`` is one of the kinds or "auto"."""
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}: expected one of {', '.join(KINDS)} or auto")


def build_faiss(kind: str, x: np.ndarray, knobs: dict[str, Any]) -> Any:
    """A trained FAISS index of kind ``kind`` holding ``x`` (N, D) (normalized float32) in row order."""
    index = _new_faiss_index(kind, x.shape[1], knobs)
    if len(x) >= 100_000:  # minutes on a few cores: say what is happening
        log.info("building a %s index over %d vectors (%s)", kind, len(x),
                 ", ".join(f"{k}={v}" for k, v in knobs.items()) or "exact")
    if not index.is_trained:
        index.train(_train_sample(x, knobs))
    if len(x):
        index.add(x)
    return index


def reranks_from_disk(kind: str, knobs: dict[str, Any]) -> bool:
    """True when the main FAISS index returns candidates that the search re-ranks from the vector file."""
    return kind == "ivfpq" and (knobs.get("refine") == "disk" or bool(knobs.get("ondisk")))


def search_params(kind: str, knobs: dict[str, Any], sel: Any = None, *, ef_search: int | None = None,
                  nprobe: int | None = None, k_factor: float | None = None) -> Any:
    """FAISS search parameters for ``kind``: stored knobs, per-call overrides and an optional ID selector.

    The caller keeps ``sel`` (and anything it points to) alive until the search returns."""
    if kind == "flat":
        return faiss.SearchParameters(sel=sel) if sel is not None else None
    if kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=int(ef_search or knobs["ef_search"]))
        if sel is not None:
            params.sel = sel
        return params
    base = faiss.SearchParametersIVF(nprobe=int(nprobe or knobs["nprobe"]))
    if sel is not None:
        base.sel = sel
    if reranks_from_disk(kind, knobs):
        return base  # the bare IVF index: no refine stage in FAISS
    params = faiss.IndexRefineSearchParameters(k_factor=float(k_factor or knobs["k_factor"]),
                                               base_index_params=base)
    params._base = base  # keep the Python wrapper (and the selector it holds) alive with params
    return params
