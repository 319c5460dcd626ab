"""Fused top-k selection over a similarity block (bf16 candidates or exact fp32), numba, CPU only.

``torch.topk`` of 300 out of 60k columns costs several times the bf16 matmul that produced them on a
2-core CPU, and the torch two-level selection (group maxima, then a gather) still reads the block three
times. This kernel reads each row once into per-group maxima (a vectorized ``np.maximum`` over
contiguous slabs), finds the k-th largest group maximum with a radix select, and scans only the groups
that reach it. The k-th largest group maximum is a lower bound on the k-th largest element (the k group
maxima are k distinct elements), so no candidate is missed.

bf16 values are handled as their int16 bit patterns mapped to order-preserving integer keys, so the
kernel needs no bf16 support from numba.

The fp32 kernel (:func:`fp32_topk`, the exact search of CPUs without native bf16) uses the same group
bound on float32 values and returns the exact top-k, ties at the k-th value resolved to the smaller
column index, as the official ``topk`` vote needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

nb: Any
try:
    import numba as nb
except ImportError:  # pragma: no cover - numba is a dependency; without it the torch selection is used
    nb = None

if nb is not None:

    @nb.njit(inline="always")
    def to_key(b):  # bf16 bits (int16) -> int in [0, 65536) ordered like the float value
        b = np.int32(b)
        return (b ^ ((b >> 15) & 0x7FFF)) + 32768

    @nb.njit(nogil=True, cache=True)
    def kth_largest(keys, n, k, hist, nbytes):
        """k-th largest of ``keys[:n]`` (ints in [0, 256**nbytes)): one 8-bit radix pass per byte,
        from the top byte down, each counting only the keys that match the bytes chosen so far."""
        prefix, mask = 0, 0
        for shift in range(8 * (nbytes - 1), -1, -8):
            hist[:] = 0
            for i in range(n):
                if (keys[i] & mask) == prefix:
                    hist[(keys[i] >> shift) & 255] += 1
            b = 255
            while hist[b] < k:  # bins from the top until the k-th largest is inside
                k -= hist[b]
                b -= 1
            prefix |= b << shift
            mask |= 255 << shift
        return prefix

    @nb.njit(nogil=True, cache=True, fastmath=True)
    def select_row(row, kk, group, out_i, out_k, gmax, keys, ck, ci, hist):
        w = row.shape[0] // group
        gmax[:] = row[:w]  # group j = columns j + m * w
        for m in range(1, group):
            np.maximum(gmax, row[m * w:(m + 1) * w], gmax)
        for j in range(w):
            # The raw int16 max is the float max for a group holding any value >= +0.0; negative bf16
            # bits compare in reverse, so an all-negative group (raw max < 0) is recomputed from keys.
            keys[j] = to_key(gmax[j]) if gmax[j] >= 0 else -1
        if keys.min() < 0:
            for j in range(w):
                if keys[j] < 0:
                    best = 0
                    for m in range(group):
                        best = max(best, to_key(row[m * w + j]))
                    keys[j] = best
        g = kth_largest(keys, w, kk, hist, 2)  # <= the kk-th largest element
        cnt = 0
        for j in range(w):
            if keys[j] >= g:
                for m in range(group):
                    key = to_key(row[m * w + j])
                    if key >= g:
                        if cnt == ck.shape[0]:
                            return False  # pathological ties: caller falls back to torch
                        ck[cnt] = key
                        ci[cnt] = m * w + j
                        cnt += 1
        t = kth_largest(ck, cnt, kk, hist, 2)
        o = 0
        for i in range(cnt):  # every key above t, then keys equal to t up to kk
            if ck[i] > t:
                out_i[o], out_k[o] = ci[i], ck[i]
                o += 1
        for i in range(cnt):
            if o == kk:
                break
            if ck[i] == t:
                out_i[o], out_k[o] = ci[i], ck[i]
                o += 1
        return True

    @nb.njit(parallel=True, nogil=True, cache=True)
    def select(a, kk, group, out_i, out_k, ok):
        q, n = a.shape
        w = n // group
        for r in nb.prange(q):
            gmax = np.empty(w, np.int16)
            keys = np.empty(w, np.int32)
            ck = np.empty(8 * kk, np.int32)
            ci = np.empty(8 * kk, np.int64)
            hist = np.empty(256, np.int64)
            ok[r] = select_row(a[r], kk, group, out_i[r], out_k[r], gmax, keys, ck, ci, hist)


if nb is not None:

    @nb.njit(inline="always")
    def f32_key(bits):  # float32 bits (int32) -> int in [0, 2^32) ordered like the value
        b = np.int64(bits)
        if b == -2147483648:  # -0.0 gets the key of +0.0 (equal values)
            b = 0
        return (b ^ ((b >> 31) & 0x7FFFFFFF)) + 2147483648

    @nb.njit(nogil=True, cache=True)
    def select_row_f32(row, k, group, out_i, out_v, gmax, gkeys, ck, ci, ties, hist):
        w = row.shape[0] // group
        bits = row.view(np.int32)
        gbits = gmax.view(np.int32)
        gmax[:] = row[:w]  # group j = columns j + m * w
        for m in range(1, group):
            np.maximum(gmax, row[m * w:(m + 1) * w], gmax)
        for j in range(w):
            if gmax[j] != gmax[j]:
                return False  # NaN in the row: let the caller use torch
            gkeys[j] = f32_key(gbits[j])
        g = kth_largest(gkeys, w, k, hist, 4)  # k distinct elements are >= g: the k-th largest is >= g
        cnt = 0
        for j in range(w):
            if gkeys[j] >= g:
                for m in range(group):
                    key = f32_key(bits[m * w + j])
                    if key >= g:
                        if cnt == ck.shape[0]:
                            return False  # pathological ties: caller falls back to torch
                        ck[cnt] = key
                        ci[cnt] = m * w + j
                        cnt += 1
        for c in range(w * group, row.shape[0]):  # the ragged tail (N not a multiple of group)
            key = f32_key(bits[c])
            if key >= g:
                if cnt == ck.shape[0]:
                    return False
                ck[cnt] = key
                ci[cnt] = c
                cnt += 1
        t = kth_largest(ck, cnt, k, hist, 4)
        o, nt = 0, 0
        for i in range(cnt):  # every key above t; the columns of the keys equal to t
            if ck[i] > t:
                out_i[o] = ci[i]
                o += 1
            elif ck[i] == t:
                ties[nt] = ci[i]
                nt += 1
        tie_cols = np.sort(ties[:nt])  # the smaller columns take the last places, as a stable sort would
        for i in range(k - o):
            out_i[o + i] = tie_cols[i]
        # the output sorted by value (descending), equal values by column (ascending): one int64 sort
        order = np.empty(k, np.int64)
        for i in range(k):
            order[i] = ((4294967295 - f32_key(bits[out_i[i]])) << 31) | out_i[i]
        order.sort()
        for i in range(k):
            c = order[i] & 2147483647
            out_i[i], out_v[i] = c, row[c] + np.float32(0.0)
        return True

    @nb.njit(parallel=True, nogil=True, cache=True)
    def select_f32(a, k, group, out_i, out_v, ok):
        q, n = a.shape
        w = n // group
        for r in nb.prange(q):
            gmax = np.empty(w, np.float32)
            gkeys = np.empty(w, np.int64)
            ck = np.empty(8 * k, np.int64)
            ci = np.empty(8 * k, np.int64)
            ties = np.empty(8 * k, np.int64)
            hist = np.empty(256, np.int64)
            ok[r] = select_row_f32(a[r], k, group, out_i[r], out_v[r], gmax, gkeys, ck, ci, ties, hist)


def fp32_topk(sims: torch.Tensor, k: int, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-``k`` values (Q, k) float32 and columns (Q, k) int64 of each row of the contiguous CPU
    fp32 block ``sims`` (Q, N), sorted by value (descending; -0.0 given as +0.0), equal values by
    column (ascending), as the official ``topk`` vote with ties broken by train index. Also ``ok`` (Q,) bool, False for rows the kernel gave up on (NaN, more than 8 k values tied
    with the threshold): their outputs are garbage. ``N`` must be at least ``k * group`` (columns
    past the last whole group are scanned one by one); needs numba (see :func:`available`).
    """
    assert nb is not None, "numba is not installed"
    q, n = sims.shape
    assert sims.dtype == torch.float32 and sims.is_contiguous() and n >= k * group
    nb.set_num_threads(max(1, min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS)))
    out_i = np.empty((q, k), np.int64)
    out_v = np.empty((q, k), np.float32)
    ok = np.empty(q, np.bool_)
    select_f32(sims.numpy(), k, group, out_i, out_v, ok)
    return torch.from_numpy(out_v), torch.from_numpy(out_i), torch.from_numpy(ok)


def available() -> bool:
    """True where numba is installed and the fused selection can run."""
    return nb is not None


def _keys_to_bf16(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of the kernel's key map: int32 keys -> bf16 values (same shape)."""
    b = keys - 32768
    return (b ^ ((b >> 15) & 0x7FFF)).to(torch.int16).view(torch.bfloat16)


def fused_select(approx: torch.Tensor, kk: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel alone: values (Q, kk) bf16, columns (Q, kk) int64 and ``ok`` (Q,) bool, False for the
    rows whose ties overflowed the kernel's buffer (their values and columns are garbage)."""
    assert nb is not None, "numba is not installed"
    q, n = approx.shape
    assert approx.dtype == torch.bfloat16 and approx.is_contiguous() and n % group == 0 and n >= kk * group
    nb.set_num_threads(max(1, min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS)))
    out_i = np.empty((q, kk), np.int64)
    out_k = np.empty((q, kk), np.int32)
    ok = np.empty(q, np.bool_)
    select(approx.view(torch.int16).numpy(), kk, group, out_i, out_k, ok)
    return _keys_to_bf16(torch.from_numpy(out_k)), torch.from_numpy(out_i), torch.from_numpy(ok)


def bf16_candidates(approx: torch.Tensor, kk: int, group: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Values (Q, kk) bf16 and column indices (Q, kk) int64 of the ``kk`` largest entries of each row of
    the contiguous CPU bf16 block ``approx`` (Q, N), unsorted, ties arbitrary. ``N`` must be a multiple
    of ``group`` and at least ``kk * group``; needs numba (see :func:`available`).
    """
    vals, cols, ok = fused_select(approx, kk, group)
    bad = (~ok).nonzero().flatten()
    if bad.numel():  # more than 8 kk values tie with the threshold: plain topk for those rows
        top = approx[bad].topk(kk, dim=1, sorted=False)
        vals[bad], cols[bad] = top.values, top.indices
    return vals, cols
