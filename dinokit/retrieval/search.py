"""k-NN search over a store snapshot: each segment searched, results merged by score.

Small segments are scored exactly (FAISS brute force). The main segment uses its FAISS index with a
bitmap ID selector that leaves out deleted items (or keeps only the items a filter allows); when the
allowed set is small, or the approximate search returns fewer results than exist, the allowed
vectors are scored exactly instead, so a filtered search never returns fewer than
min(k, passing items) results.

An IVF-PQ index built with ``refine="disk"`` (or ``ondisk=1``) holds no copy of the vectors: FAISS
returns ``k * k_factor`` candidates from the codes and they are re-ranked here by exact inner product
with their rows of the segment's float32 vector file (memory-mapped: only those rows are read).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dinokit.retrieval.kinds import faiss, reranks_from_disk, search_params
from dinokit.retrieval.store import Segment, Snapshot

# below this many allowed vectors exact scoring beats an approximate index with a selector
EXACT_MAX = 4096
# bytes of candidate vectors gathered at once by a re-rank from disk (64 queries x 320 x 384-d: 31 MB)
_RERANK_BYTES = 32 * 2**20


def search_snapshot(snap: Snapshot, x: np.ndarray, k: int, allowed: np.ndarray | None,
                    knobs: dict[str, Any], **overrides: Any) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` (scores float32 (Q, k), ids int64 (Q, k)) of normalized queries ``x`` (Q, D) over
    live items; ``allowed``: sorted ids a filter lets through (None: all live). Missing: -inf / -1."""
    parts = [_search_segment(seg, x, k, _candidate_rows(seg, allowed, snap), knobs, overrides)
             for seg in snap.segments]
    if not parts:
        return np.full((len(x), k), -np.inf, np.float32), np.full((len(x), k), -1, np.int64)
    if len(parts) == 1 and parts[0][0].shape[1] == k:  # one segment (a compacted index): already best first
        scores, ids = parts[0]
        scores[ids < 0] = -np.inf
        return scores.astype(np.float32, copy=False), ids
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores[ids < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores.astype(np.float32), ids


def _rows_of(seg: Segment, ids: np.ndarray) -> np.ndarray:
    """Sorted rows of ``seg`` holding any of the sorted ``ids``: O(len(ids) log n)."""
    if len(seg.ids) == 0 or len(ids) == 0:
        return np.zeros(0, np.int64)
    pos = np.searchsorted(seg.ids, ids)
    ok = pos < len(seg.ids)
    ok[ok] = seg.ids[pos[ok]] == ids[ok]
    return pos[ok].astype(np.int64)


def _candidate_rows(seg: Segment, allowed: np.ndarray | None, snap: Snapshot) -> np.ndarray | None:
    """Rows of ``seg`` that may be returned (None: all of them): the allowed ids it holds, or its
    rows minus the deleted ones (memoized per snapshot: deletions change only with a commit)."""
    if allowed is not None:
        return _rows_of(seg, allowed)
    key = "live:" + seg.name
    if key not in snap.memo:
        dead = _rows_of(seg, snap.deleted)
        snap.memo[key] = None if len(dead) == 0 else np.setdiff1d(np.arange(len(seg.ids)), dead, assume_unique=True)
    return snap.memo[key]


def _search_segment(seg: Segment, x: np.ndarray, k: int, rows: np.ndarray | None, knobs: dict[str, Any],
                    overrides: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    n = len(seg.ids) if rows is None else len(rows)
    if n == 0:
        return np.zeros((len(x), 0), np.float32), np.zeros((len(x), 0), np.int64)
    if seg.index is None or (rows is not None and n <= EXACT_MAX):
        return _exact(seg, x, k, rows)
    scores, found = _approximate(seg, x, min(k, n), rows, knobs, overrides)
    if (found < 0).any():  # an approximate index can come up short under a selector: never return fewer
        return _exact(seg, x, k, rows)
    return scores, seg.ids[found]


def _exact(seg: Segment, x: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    vectors = seg.vectors if rows is None else seg.vectors[rows]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    k = min(k, len(vectors))
    scores, found = faiss.knn(x, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    pos = found if rows is None else rows[np.maximum(found, 0)]
    ids = np.where(found >= 0, seg.ids[np.maximum(pos, 0)], -1)
    return scores.astype(np.float32), ids.astype(np.int64)


def _approximate(seg: Segment, x: np.ndarray, k: int, rows: np.ndarray | None, knobs: dict[str, Any],
                 overrides: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search of the main index; ``rows`` allowed (None: all). Returns scores and rows (-1 missing)."""
    sel = bitmap = None
    if rows is not None:
        mask = np.zeros(len(seg.ids), dtype=bool)
        mask[rows] = True
        bitmap = np.packbits(mask, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(seg.ids), faiss.swig_ptr(bitmap))
    given = {k_: v for k_, v in overrides.items() if v is not None}
    params = search_params(seg.kind, knobs, sel, **given)
    if reranks_from_disk(seg.kind, knobs):
        n_cand = max(k, int(k * float(given.get("k_factor") or knobs.get("k_factor", 1))))
        _, cand = seg.index.search(x, min(n_cand, len(seg.ids)), params=params)
        del sel, bitmap
        return _rerank(seg.vectors, x, cand.astype(np.int64), k)
    scores, found = seg.index.search(x, k, params=params)
    del sel, bitmap  # the selector points into the bitmap: both live until the search returned
    return scores.astype(np.float32), found.astype(np.int64)


def _rerank(vectors: np.ndarray, x: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` of candidate rows ``cand`` (Q, C) (-1: none) by inner product with ``x`` (Q, D),
    reading the candidates' rows of ``vectors`` (a memory map), a block of queries at a time."""
    q, c = cand.shape
    block = max(1, _RERANK_BYTES // max(1, c * x.shape[1] * 4))  # block x C x D float32 gathered at once
    scores = np.empty(cand.shape, np.float32)
    for s in range(0, q, block):
        rows = np.maximum(cand[s:s + block], 0)
        gathered = np.asarray(vectors[rows.ravel()], dtype=np.float32).reshape(len(rows), c, -1)
        scores[s:s + block] = np.matmul(gathered, x[s:s + block, :, None])[..., 0]  # batched dot products
    scores[cand < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, 1)
    found = np.where(np.isfinite(top), np.take_along_axis(cand, order, 1), -1)
    return top, found.astype(np.int64)
