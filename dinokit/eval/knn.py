"""Weighted k-NN classification, the DINO evaluation protocol, made fast and exact.

The vote is the official one (DINO ``eval_knn.knn_classifier``): features are L2-normalized, the
similarity is the cosine, the k most similar train features vote for their class with weight
``exp(sim / T)``, and class scores are the sums of the weights. Unlike the official script it works for
any number of classes and test images, scores several k in one search, and keeps memory bounded by
processing test rows and train rows in chunks.

Search paths (all give the same neighbours, up to fp32 rounding):

- ``precision="fp32"``: exact fp32 similarities, ``topk`` per chunk (the official algorithm).
- ``precision="bf16"``: a bf16 matmul (about 2x the fp32 speed on CPUs with AVX-512 BF16 and on GPUs)
  proposes ``kmax + margin`` candidates per test row, their exact fp32 similarities are recomputed
  and re-ranked, and a rigorous bound on the bf16 error certifies that no other train feature can beat
  the k-th neighbour; rows that cannot be certified are searched again in fp32. The result is
  therefore the fp32 result, not an approximation of it. On CPUs the candidates come from a fused
  numba kernel (:mod:`dinokit.eval._topk_cpu`) that reads the bf16 block once.
- ``backend="faiss"``: an exact ``IndexFlatIP`` fed chunk by chunk (train sets given as memory-mapped
  arrays never need to be fully in RAM as torch tensors).

Ordering is deterministic: neighbours with equal similarity are ranked by train index (smaller
first), classes with equal score by class index (smaller first). Top-5 uses ``min(5, C)`` classes.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from dinokit._types import Progress
from dinokit.devices import cpu_has_native_bf16, resolve_device

logger = logging.getLogger(__name__)

ArrayLike = torch.Tensor | np.ndarray
Backend = Literal["auto", "torch", "faiss"]
Precision = Literal["auto", "fp32", "bf16"]

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
# Similarity block budget per test chunk (~2000 test rows against 60k train rows in bf16). One buffer
# is reused by every chunk (matmul out=): a fresh 100+ MB block per chunk cost 25-40% of the bf16
# matmul time on the 2-core CPU (benchmarks/RESULTS.md).
_CHUNK_BYTES = 256 * 2**20
_TRAIN_CHUNK_ROWS = 1 << 18  # train rows normalized and searched at once
_GROUP = 16  # group size of the torch two-level candidate selection
_GROUP_CPU = 32  # group size of the fused CPU selection (fewer groups to rank; 16 is 15% slower)
_BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


# ------------------------------------------------------------------------------------------ inputs


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def _rows(x: ArrayLike, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of a tensor or (memory-mapped) array as L2-normalized fp32 on ``device``."""
    chunk = x[start:stop]
    t = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(chunk))
    return F.normalize(t.to(device=device, dtype=torch.float32), dim=1)


def _labels(y: ArrayLike, name: str) -> torch.Tensor:
    t = _as_tensor(y).reshape(-1)
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"{name}: labels must be integers")
    t = t.to(torch.int64).cpu()
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name}: labels must be >= 0 (got {int(t.min())})")
    return t


def _check_features(x: ArrayLike, name: str) -> None:
    if len(x.shape) != 2:
        raise ValueError(f"{name}: expected a (N, D) feature matrix, got shape {tuple(x.shape)}")


def _resolve_precision(precision: Precision, device: torch.device, n_train: int, n_test: int, kk: int) -> str:
    if precision != "auto":
        return precision
    # The certified bf16 path pays off on big problems on hardware with native bf16 matmuls.
    if n_train * n_test < 20_000_000 or n_train < 8 * kk:
        return "fp32"
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


# ------------------------------------------------------------------------------------------ ordering


def _sort_desc(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value (descending), equal values by index (ascending). Shapes (Q, K).

    One int64 sort: the fp32 bits mapped to an order-preserving integer fill the high 32 bits and the
    index the low 31 (two argsorts and four gathers took 1.5x longer on the k-NN benchmark).
    """
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 2**31):
        by_index = indices.argsort(dim=1)  # indices too large for the packed key (never in practice)
        values, indices = values.gather(1, by_index), indices.gather(1, by_index)
        order = values.argsort(dim=1, descending=True, stable=True)
        return values.gather(1, order), indices.gather(1, order)
    v = values.float() + 0.0  # -0.0 -> +0.0 so that equal values tie on the index
    bits = v.view(torch.int32).to(torch.int64)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed int ordered like the float
    key = ((2**31 - 1 - ordered) << 31) | indices  # ascending key = value desc, index asc
    if key.device.type == "cpu":  # numpy's vectorized sort (AVX-512/AVX2): 10x torch.sort on 200-wide rows
        key = torch.from_numpy(np.sort(key.numpy(), axis=1))
    else:
        key = key.sort(dim=1).values
    ordered = 2**31 - 1 - (key >> 31)
    bits = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(torch.int32)
    return bits.view(torch.float32), key & (2**31 - 1)


def _merge(run_v: torch.Tensor | None, run_i: torch.Tensor | None, v: torch.Tensor, i: torch.Tensor,
           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two per-row candidate lists and keep the best ``k`` (value desc, index asc)."""
    if run_v is not None and run_i is not None:
        v, i = torch.cat([run_v, v], dim=1), torch.cat([run_i, i], dim=1)
    v, i = _sort_desc(v, i)
    return v[:, :k], i[:, :k]


def _exact_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``sims`` (Q, N) with deterministic tie-breaking by column index."""
    n = sims.shape[1]
    if k >= n:
        idx = torch.arange(n, device=sims.device).expand(sims.shape[0], n)
        return _sort_desc(sims, idx.contiguous())
    if sims.device.type == "cpu" and sims.dtype == torch.float32 and n >= k * _GROUP_CPU:
        from dinokit.eval import _topk_cpu  # imports numba: only when a large CPU search runs

        if _topk_cpu.available():  # one read of the block instead of torch.topk's (3x faster at k=200)
            v, i, ok = _topk_cpu.fp32_topk(sims.contiguous(), k, _GROUP_CPU)  # sorted rows
            bad = (~ok).nonzero().flatten()
            if bad.numel():  # NaN or massive ties: the torch path below for those rows
                v[bad], i[bad] = _torch_topk(sims[bad], k)
            return v, i
    return _torch_topk(sims, k)


def _torch_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_exact_topk`` with ``torch.topk`` (any device); ``k`` < N."""
    v, i = sims.topk(k + 1, dim=1)
    v, i = _sort_desc(v, i)
    # A row whose k-th and (k+1)-th values tie may have dropped a smaller index: redo it by hand.
    tied = (v[:, k - 1] == v[:, k]).nonzero().flatten()
    v, i = v[:, :k].clone(), i[:, :k].clone()
    for r in tied.tolist():
        cols = (sims[r] >= v[r, k - 1]).nonzero().flatten()  # ascending column order
        order = sims[r, cols].argsort(descending=True, stable=True)[:k]
        v[r], i[r] = sims[r, cols[order]], cols[order]
    return v, i


# ------------------------------------------------------------------------------------------ search


def _candidates(approx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and column indices (Q, k) of the ``k`` largest entries of each row of the bf16 block
    ``approx`` (Q, N), unsorted: the fused numba kernel on CPUs (5x faster), else the torch selection."""
    n = approx.shape[1]
    if approx.device.type == "cpu":
        from dinokit.eval import _topk_cpu  # imports numba: only when a bf16 search runs

        if _topk_cpu.available():
            for group in (_GROUP_CPU, _GROUP):
                if n % group == 0 and n >= k * group:
                    return _topk_cpu.bf16_candidates(approx, k, group)
    return _group_candidates(approx, k)


def _group_candidates(approx: torch.Tensor, k: int, group: int = _GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and column indices (Q, k) of the ``k`` largest entries of each row of ``approx`` (Q, N),
    unsorted, ties arbitrary.

    Two-level selection: split the columns into N / group groups; the top-k elements lie in the k
    groups with the largest maxima, so a topk over the group maxima and then over the k * group
    gathered values replaces a topk over all N columns (the slow part on CPUs). Group j holds the
    columns j + m * N / group (strided, so the maxima are a fast elementwise max of contiguous
    slabs). ``N`` must be a multiple of ``group``.
    """
    q, n = approx.shape
    width = n // group
    if width <= 2 * k:
        top = approx.topk(k, dim=1, sorted=False)
        return top.values, top.indices
    slabs = approx.view(q, group, width)
    top_groups = slabs.amax(dim=1).topk(k, dim=1, sorted=False).indices  # (Q, k)
    vals = slabs.gather(2, top_groups.unsqueeze(1).expand(q, group, k))  # (Q, group, k)
    top = vals.view(q, -1).topk(k, dim=1, sorted=False)  # into group * k
    sel = top.indices
    return top.values, (sel // k) * width + top_groups.gather(1, sel % k)


def _pair_dots(test: torch.Tensor, train: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Exact fp32 dot products ``test[q] . train[cols[q, j]]`` -> (Q, K), without a (Q, K, D) gather.

    The pairs are grouped by train row (a CSR mask over train x test for ``sampled_addmm``), so each
    train row is read once per chunk and the test chunk stays in cache: twice as fast on the k-NN
    benchmark as grouping by test row, which reads a random train row for every pair.
    """
    q, k = cols.shape
    flat = cols.reshape(-1)
    try:
        order = flat.argsort(stable=True)  # pairs by train row, then by test row
        counts = torch.bincount(flat, minlength=train.shape[0])
        crow = F.pad(counts.cumsum(0), (1, 0))
        test_of_pair = order // k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            mask = torch.sparse_csr_tensor(crow, test_of_pair, torch.zeros(q * k, device=test.device),
                                           size=(train.shape[0], q), check_invariants=False)
            out = torch.sparse.sampled_addmm(mask, train, test.T, beta=0.0)
        # The values come back in CSR order as long as the column indices were sorted (they are):
        # check instead of trusting it, then scatter them back to (test row, slot).
        if torch.equal(out.col_indices(), test_of_pair):
            res = torch.empty(q * k, device=test.device)
            res[order] = out.values()
            return res.view(q, k)
    except (RuntimeError, NotImplementedError):
        pass
    # Portable fallback: gather in small blocks so the (B, K, D) buffer stays small.
    res = torch.empty(q, k, device=test.device)
    step = max(1, 2**22 // max(1, k * train.shape[1]))
    for s in range(0, q, step):
        rows = train[cols[s:s + step]]  # (b, K, D)
        res[s:s + step] = torch.bmm(rows, test[s:s + step].unsqueeze(2)).squeeze(2)
    return res


def _bf16_error_bound(test: torch.Tensor, test_lo: torch.Tensor, train_bnorm_max: float,
                      train_res_max: float) -> torch.Tensor:
    """Per test row, a bound on |fp32 product of bf16 inputs - exact cosine| (before output rounding).

    |a'.b' - a.b| <= ||a - a'|| ||b'|| + ||a|| ||b - b'|| plus fp32 accumulation error.
    """
    d = test.shape[1]
    a_norm = test.norm(dim=1)
    res_a = test_lo.norm(dim=1)
    accum = 2 * d * 2.0**-24 * (a_norm + res_a) * train_bnorm_max
    return res_a * train_bnorm_max + a_norm * train_res_max + accum + 1e-6


def _exact_search(test: torch.Tensor, train: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 top-``k`` of normalized ``test`` (Q, D) against normalized ``train`` (N, D), on the CPU."""
    qc = max(1, _CHUNK_BYTES // (4 * train.shape[0]))
    out = [_exact_topk(torch.mm(test[s:s + qc].to(train.device), train.T), k) for s in range(0, len(test), qc)]
    return torch.cat([v for v, _ in out]).cpu(), torch.cat([i for _, i in out]).cpu()


def knn_search(
    train_features: ArrayLike,
    test_features: ArrayLike,
    k: int,
    *,
    chunk_size: int | None = None,
    train_chunk_size: int | None = None,
    device: str | torch.device | None = None,
    backend: Backend = "torch",
    precision: Precision = "auto",
    margin: int | None = None,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-``k`` neighbours of every test feature among the train features.

    train_features (N, D), test_features (Q, D): tensors or arrays (memory-mapped arrays are read
    chunk by chunk). Returns ``(sims (Q, k) float32, indices (Q, k) int64)`` on the CPU, sorted by
    similarity (descending), ties by train index. ``k`` is clamped to N.
    """
    _check_features(train_features, "train_features")
    _check_features(test_features, "test_features")
    n_train, n_test = int(train_features.shape[0]), int(test_features.shape[0])
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature sizes differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    if n_train == 0:
        raise ValueError("train_features: empty")
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    k = min(k, n_train)
    if n_test == 0:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
    if backend == "faiss":
        return _faiss_search(train_features, test_features, k, chunk_size, train_chunk_size, progress)
    if backend not in ("torch", "auto"):
        raise ValueError(f"unknown k-NN backend {backend!r}; expected 'torch' or 'faiss'")

    dev = resolve_device(device)
    # k=200: margin 150 leaves ~0.1% of the rows to the fp32 re-search, margin 100 about 3%
    margin = margin if margin is not None else max(32, (3 * k) // 4)
    kk = min(n_train, k + margin)
    prec = _resolve_precision(precision, dev, n_train, n_test, kk)
    if prec not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; expected 'auto', 'fp32' or 'bf16'")
    tc = train_chunk_size or _TRAIN_CHUNK_ROWS
    elem = 2 if prec == "bf16" else 4
    qc = chunk_size or max(1, min(n_test, _CHUNK_BYTES // (elem * min(tc, n_train))))
    if chunk_size is None and qc >= 512:
        qc -= qc % 256  # whole matmul blocks: 2048 rows ran 5% faster than 2236 on the 60k benchmark
    logger.debug("k-NN search: %d train x %d test, k=%d, %s, device %s, chunks %d/%d",
                 n_train, n_test, k, prec, dev, qc, tc)

    test_all = torch.cat([_rows(test_features, s, s + qc, dev).cpu() for s in range(0, n_test, qc)]) \
        if dev.type == "cpu" else None
    run_v: list[torch.Tensor | None] = [None] * math.ceil(n_test / qc)
    run_i: list[torch.Tensor | None] = [None] * len(run_v)
    bound = torch.full((n_test,), -math.inf)  # bf16: largest similarity a non-candidate may have
    total = math.ceil(n_train / tc) * len(run_v)
    done = 0
    for t0 in range(0, n_train, tc):
        train = _rows(train_features, t0, t0 + tc, dev)
        approx_pass = prec == "bf16" and train.shape[0] > kk  # else an exact fp32 search of the chunk
        if approx_pass:
            pad = (-train.shape[0]) % _GROUP_CPU  # a multiple of both group sizes
            train_b = torch.zeros(train.shape[0] + pad, train.shape[1], dtype=torch.bfloat16, device=dev)
            train_b[: train.shape[0]] = train
            train_bf = train_b[: train.shape[0]].float()
            bnorm_max = float(train_bf.norm(dim=1).max())
            res_max = float((train - train_bf).norm(dim=1).max())
            del train_bf
            buf = torch.empty(qc, train_b.shape[0], dtype=torch.bfloat16, device=dev)
        else:
            buf = torch.empty(qc, train.shape[0], device=dev)
        for ci, q0 in enumerate(range(0, n_test, qc)):
            test = test_all[q0:q0 + qc] if test_all is not None else _rows(test_features, q0, q0 + qc, dev)
            if not approx_pass:
                sims = torch.mm(test, train.T, out=buf[: test.shape[0]])
                v, i = _exact_topk(sims, min(k, train.shape[0]))
            else:
                test_b = test.to(torch.bfloat16)
                approx = torch.mm(test_b, train_b.T, out=buf[: test.shape[0]])  # (B, N + pad) bf16
                if pad:
                    approx[:, train.shape[0]:] = -math.inf
                a_vals, cols = _candidates(approx, kk)
                a_kk = a_vals.float().amin(dim=1)  # every non-candidate is <= this
                v, i = _sort_desc(_pair_dots(test, train, cols), cols)
                v, i = v[:, :k], i[:, :k]
                err = _bf16_error_bound(test, test - test_b.float(), bnorm_max, res_max)
                # bf16 output rounding: |fl(p) - p| <= u |fl(p)| / (1 - u); a + c|a| grows with a.
                c = _BF16_U / (1 - _BF16_U)
                b = (a_kk + c * a_kk.abs() + err).cpu()
                bound[q0:q0 + qc] = torch.maximum(bound[q0:q0 + qc], b)
            v, i = v.cpu(), (i + t0).cpu()
            if run_v[ci] is not None:  # lists from earlier train chunks hold smaller indices
                v, i = _merge(run_v[ci], run_i[ci], v, i, k)
            run_v[ci], run_i[ci] = v, i
            done += 1
            if progress is not None:
                progress(done, total)
    sims = torch.cat([v for v in run_v if v is not None])
    idx = torch.cat([i for i in run_i if i is not None])
    if prec == "bf16":
        # Certified when the k-th exact similarity beats every possible non-candidate.
        failed = (sims[:, -1] <= bound).nonzero().flatten()
        if failed.numel():
            logger.debug("k-NN bf16 pass: %d of %d rows re-searched in fp32", failed.numel(), n_test)
            if test_all is not None and n_train <= tc:  # the normalized train set is still at hand
                sv, si = _exact_search(test_all[failed], train, k)
            else:
                sub = test_all[failed] if test_all is not None else _as_tensor(test_features)[failed]
                sv, si = knn_search(train_features, sub, k, chunk_size=chunk_size,
                                    train_chunk_size=train_chunk_size, device=dev, precision="fp32")
            sims[failed], idx[failed] = sv, si
    return sims, idx


def _faiss_search(train_features: ArrayLike, test_features: ArrayLike, k: int, chunk_size: int | None,
                  train_chunk_size: int | None, progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product search of normalized features with a FAISS ``IndexFlatIP``."""
    import faiss

    cpu = torch.device("cpu")
    index = faiss.IndexFlatIP(int(train_features.shape[1]))
    n_train, n_test = int(train_features.shape[0]), int(test_features.shape[0])
    tc = train_chunk_size or _TRAIN_CHUNK_ROWS
    for t0 in range(0, n_train, tc):
        index.add(_rows(train_features, t0, t0 + tc, cpu).numpy())
    qc = chunk_size or 4096
    sims, idx = [], []
    for q0 in range(0, n_test, qc):
        d, i = index.search(_rows(test_features, q0, q0 + qc, cpu).numpy(), k)
        v, ii = _sort_desc(torch.from_numpy(d), torch.from_numpy(i).to(torch.int64))
        sims.append(v)
        idx.append(ii)
        if progress is not None:
            progress(min(q0 + qc, n_test), n_test)
    return torch.cat(sims), torch.cat(idx)


# ------------------------------------------------------------------------------------------ vote


def weighted_vote(sims: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int, T: float = 0.07
                  ) -> torch.Tensor:
    """Official DINO vote: class scores (Q, C) = sum over the neighbours of ``exp(sim / T)`` per class.

    sims (Q, k) cosine similarities, neighbor_labels (Q, k) int64 class of each neighbour.
    """
    weights = (sims.float() / T).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32, device=sims.device)
    return scores.scatter_add_(1, neighbor_labels, weights)


def rank_classes(scores: torch.Tensor) -> torch.Tensor:
    """Class indices (Q, C) from best to worst score; equal scores rank the smaller class first."""
    return scores.argsort(dim=1, descending=True, stable=True)


def _metrics(ranked: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """top-1/top-5 (percent), per-class top-1 (percent, None for absent classes) and the confusion."""
    n = targets.numel()
    top = min(5, num_classes)
    hit = ranked[:, :top] == targets.unsqueeze(1)
    pred = ranked[:, 0]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((targets, pred), torch.ones_like(targets), accumulate=True)
    per_class_n = confusion.sum(dim=1)
    correct = confusion.diagonal()
    per_class = [None if int(c) == 0 else 100.0 * float(ok) / float(c) for ok, c in zip(correct, per_class_n,
                                                                                      strict=True)]
    return {
        "top1": 100.0 * float(hit[:, 0].sum()) / n if n else float("nan"),
        "top5": 100.0 * float(hit.any(dim=1).sum()) / n if n else float("nan"),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "num_test": n,
    }


def knn_scores(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    k: int = 20,
    T: float = 0.07,
    *,
    num_classes: int | None = None,
    **search_kwargs: Any,
) -> torch.Tensor:
    """Class scores (Q, C) of the official weighted vote, for prediction without test labels."""
    ytr = _labels(train_labels, "train_labels")
    c = num_classes or int(ytr.max()) + 1
    sims, idx = knn_search(train_features, test_features, k, **search_kwargs)
    return weighted_vote(sims, ytr[idx], c, T)


def knn_classify_multi(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    ks: Sequence[int] = DEFAULT_KS,
    T: float = 0.07,
    *,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    train_chunk_size: int | None = None,
    device: str | torch.device | None = None,
    backend: Backend = "torch",
    precision: Precision = "auto",
    margin: int | None = None,
    progress: Progress | None = None,
) -> dict[int, dict[str, Any]]:
    """Weighted k-NN accuracy for several k with ONE neighbour search (the top-max(k)).

    Returns ``{k: {"top1": %, "top5": %, "per_class": [% or None per class], "confusion": C x C
    counts (rows: true class, columns: top-1 prediction), "num_test": Q}}``. A k larger than the
    train set is clamped to it (with a warning).
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers (got {ks})")
    if T <= 0:
        raise ValueError(f"temperature must be > 0 (got {T})")
    ytr = _labels(train_labels, "train_labels")
    yte = _labels(test_labels, "test_labels")
    if ytr.numel() != train_features.shape[0]:
        raise ValueError(f"train_labels: {ytr.numel()} labels for {train_features.shape[0]} train features")
    if yte.numel() != test_features.shape[0]:
        raise ValueError(f"test_labels: {yte.numel()} labels for {test_features.shape[0]} test features")
    seen = max(int(ytr.max()), int(yte.max()) if yte.numel() else 0) + 1
    if num_classes is None:
        num_classes = seen
    elif num_classes < seen:
        raise ValueError(f"num_classes={num_classes} but labels go up to {seen - 1}")
    n_train = ytr.numel()
    if max(ks) > n_train:
        logger.warning("k=%d is larger than the train set (%d); using k=%d", max(ks), n_train, n_train)
    sims, idx = knn_search(train_features, test_features, max(ks), chunk_size=chunk_size,
                           train_chunk_size=train_chunk_size, device=device, backend=backend,
                           precision=precision, margin=margin, progress=progress)
    neighbor_labels = ytr[idx]
    results: dict[int, dict[str, Any]] = {}
    for k in ks:
        kk = min(k, n_train)
        scores = weighted_vote(sims[:, :kk], neighbor_labels[:, :kk], num_classes, T)
        results[k] = {"k": k, **_metrics(rank_classes(scores), yte, num_classes)}
    return results


def knn_classify(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    k: int | Sequence[int] = 20,
    T: float = 0.07,
    *,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    backend: Backend = "torch",
    precision: Precision = "auto",
) -> dict[str, Any]:
    """Official DINO weighted k-NN: ``{"top1": %, "top5": %}`` on the test set.

    train_features (N, D), train_labels (N,), test_features (Q, D), test_labels (Q,): tensors or
    numpy arrays; features need not be normalized. ``k`` may be a list (``[10, 20, 100, 200]``):
    then one neighbour search scores them all and the result is ``{k: {"top1", "top5"}}``. See
    :func:`knn_classify_multi` for per-class accuracy and confusion matrices.
    """
    ks = [int(k)] if isinstance(k, (int, np.integer)) else [int(v) for v in k]
    res = knn_classify_multi(train_features, train_labels, test_features, test_labels, ks=ks, T=T,
                             num_classes=num_classes, chunk_size=chunk_size, device=device, backend=backend,
                             precision=precision)
    scores: dict[Any, Any] = {kk: {"top1": res[kk]["top1"], "top5": res[kk]["top5"]} for kk in ks}
    return scores[ks[0]] if isinstance(k, (int, np.integer)) else scores


def knn_report(results: dict[int, dict[str, Any]], classes: Sequence[str], *, T: float, features: str,
               model: dict[str, Any], train: str, val: str, num_train: int,
               skipped: Sequence[tuple[str, str]] = (), seconds: dict[str, float] | None = None
               ) -> dict[str, Any]:
    """The JSON-ready k-NN report of ``knn-eval``: scores, per-class accuracy and confusion per k.

    ``results`` is :func:`knn_classify_multi`'s output; ``model`` says which model made the features.
    """
    num_val = next(iter(results.values()))["num_test"] if results else 0
    return {
        "model": model, "train": train, "val": val, "num_train": num_train, "num_val": num_val,
        "classes": list(classes), "temperature": T, "features": features,
        "results": {str(kk): {"top1": r["top1"], "top5": r["top5"],
                              "per_class": dict(zip(classes, r["per_class"], strict=True)),
                              "confusion": r["confusion"]} for kk, r in results.items()},
        "skipped": [list(s) for s in skipped],
        "seconds": dict(seconds or {}),
    }
