"""Retrieval benchmark: build time, memory per vector, queries/s and recall@10 of each index kind.

Data shaped like real embeddings (uniform random vectors in 384-d have no meaningful neighbours and
make every approximate index look broken): unit vectors from 2,000 clusters in a 64-d subspace,
rotated into 384-d, plus isotropic noise. Queries come from the same distribution (held out).
Recall@10 is measured against the exact (flat) index on the same data.

    .venv/bin/python benchmarks/retrieval.py --sizes 100000 1000000 --queries 1000 --json out.json
    .venv/bin/python benchmarks/retrieval.py --add-cost 1000 100000     # the store's cost per add
    .venv/bin/python benchmarks/retrieval.py --store-search 200000 --kinds ivfpq   # filters, removals, segments

Prints a markdown table (paste it into benchmarks/RESULTS.md). Timings on a shared machine are
noisy; the exact kind, measured in the same process, is the baseline for the speed-up column.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads make
# faiss 5-10x slower (measured: IVF-PQ training 58 s active vs 6 s passive). Must precede the imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinokit.retrieval.index import Index
from dinokit.retrieval.kinds import set_num_threads


def clustered(n: int, dim: int = 384, sub: int = 64, n_clusters: int = 2000, spread: float = 0.6,
              noise: float = 0.04, seed: int = 0, chunk: int = 200_000) -> np.ndarray:
    """(n, dim) float32 unit vectors: cluster centre + spread * N(0, I_sub) in a random 64-d subspace,
    rotated into ``dim`` dims, plus ``noise`` * N(0, I_dim)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, sub)).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, sub)))[0].astype(np.float32)  # (dim, sub) orthonormal
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        lab = rng.integers(0, n_clusters, m)
        z = centers[lab] + spread * rng.standard_normal((m, sub), dtype=np.float32)
        x = z @ basis.T + noise * rng.standard_normal((m, dim), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(found, truth, strict=True)]))


def file_bytes(index: Index) -> int:
    """Bytes of the FAISS index file of the main segment (what version-1 folders stored)."""
    import faiss

    main = next(s for s in index._store.snapshot().segments if s.role == "main")
    if main.kind == "flat":
        return int(main.vectors.nbytes) + 45  # IndexFlatIP file: the vectors plus a header
    return len(faiss.serialize_index(main.index))


def _bytes_written() -> int:
    """Bytes this process passed to write(2) so far (Linux /proc/self/io wchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io (Linux only)")


def add_cost(sizes: list[int], batch: int = 10, n_adds: int = 30, dim: int = 384) -> list[dict[str, Any]]:
    """Bytes written and milliseconds per ``add`` of ``batch`` vectors to a saved store of n items,
    against what the version-1 format rewrote per add (the whole FAISS file and paths.json)."""
    rows = []
    for n in sizes:
        x = clustered(n + batch * n_adds, dim=dim, seed=n)
        paths = [f"photos/{i:08d}.jpg" for i in range(len(x))]
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d) / "idx"
            Index.from_features(x[:n], paths[:n], kind="flat").save(folder)
            index = Index.load(folder)
            v1_bytes = file_bytes(index) + len(json.dumps(paths[:n]))
            costs, times = [], []
            for j in range(n_adds):
                s = n + j * batch
                before, t = _bytes_written(), time.perf_counter()
                index.add(features=x[s:s + batch], paths=paths[s:s + batch],
                          metadata=[{"sku": f"s{i}"} for i in range(s, s + batch)])
                times.append(1000 * (time.perf_counter() - t))
                costs.append(_bytes_written() - before)
            assert index.count == n + batch * n_adds
        row = {"n": n, "batch": batch, "adds": n_adds, "bytes_per_add_median": float(np.median(costs)),
               "bytes_per_add_mean": float(np.mean(costs)), "ms_per_add_median": float(np.median(times)),
               "ms_per_add_p90": float(np.percentile(times, 90)), "v1_bytes_per_add": v1_bytes}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def store_search(n: int, kind: str, dim: int = 384, repeat: int = 20) -> list[dict[str, Any]]:
    """One-query latency (ms) of an index of n items with metadata: plain, filtered (0.1% / 50% / two
    keys passing), with 1% removed, and with small segments added after the build."""
    x = clustered(n + 100, dim=dim, seed=2)
    q, x = x[n:], x[:n]
    meta = [{"sku": f"s{i % 1000}", "shop": "ab"[i % 2]} for i in range(n)]
    index = Index.from_features(x, [f"p/{i}" for i in range(n)], kind=kind, metadata=meta)
    rows = []

    def run(case: str, **kw: Any) -> None:
        t = time.perf_counter()
        index.search_vectors(q[99], k=10, **kw)  # first call: filters are looked up, then remembered
        first = 1000 * (time.perf_counter() - t)
        lat = []
        for i in range(repeat):
            t = time.perf_counter()
            index.search_vectors(q[i], k=10, **kw)
            lat.append(1000 * (time.perf_counter() - t))
        row = {"n": n, "kind": index.kind, "case": case, "first_ms": first,
               "median_ms": float(np.median(lat)), "p90_ms": float(np.percentile(lat, 90))}
        print(json.dumps(row), flush=True)
        rows.append(row)

    run("no filter")
    run("filter, 0.1% pass", filter={"sku": "s7"})
    run("filter, 50% pass", filter={"shop": "a"})
    run("filter, two keys, 0.05% pass", filter={"shop": "b", "sku": "s7"})
    index.remove(range(0, n, 100))
    run("no filter, 1% removed")
    for j in range(5):
        index.add(features=q[j * 10:(j + 1) * 10], paths=[f"new/{j}/{i}" for i in range(10)])
    run("no filter, 1% removed, 5 adds pending in small segments")
    return rows


def add_cost_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| items in the index | add of | bytes written per add (median / mean) | ms per add (median / p90) "
             "| version-1 format: bytes rewritten per add |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['batch']} vectors | {r['bytes_per_add_median']:,.0f} / "
                     f"{r['bytes_per_add_mean']:,.0f} | {r['ms_per_add_median']:.1f} / {r['ms_per_add_p90']:.1f} "
                     f"| {r['v1_bytes_per_add']:,} |")
    return "\n".join(lines)


def measure(index: Index, q: np.ndarray, truth: np.ndarray, n_single: int, **search_kw: Any) -> dict[str, Any]:
    index.search(q[:10], k=10, **search_kw)  # warm-up
    t = time.perf_counter()
    res = index.search(q, k=10, **search_kw)
    batched = len(q) / (time.perf_counter() - t)
    lat = []
    for i in range(n_single):
        t = time.perf_counter()
        index.search(q[i], k=10, **search_kw)
        lat.append(time.perf_counter() - t)
    lat_ms = 1000 * np.asarray(lat)
    return {"qps_batched": batched, "single_ms_median": float(np.median(lat_ms)),
            "single_ms_p95": float(np.percentile(lat_ms, 95)), "qps_single": 1000 / float(np.mean(lat_ms)),
            "recall@10": recall_at(res.ids, truth)}


def load_features(spec: str, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real features: a dinokit feature file (.npz/.npy/.safetensors, from `dinokit embed`) or
    ``fashion-mnist`` (raw 784-d pixels of the 70k images: real image data, not DINO features).
    A random ``n_queries`` rows are held out as queries."""
    if spec == "fashion-mnist":
        from dinokit.data.fashion_mnist import load_fashion_mnist

        xs = [load_fashion_mnist(split)[0] for split in ("train", "test")]
        feats = np.concatenate(xs).reshape(-1, 784).astype(np.float32)
        feats -= feats.mean(axis=0)  # centred pixels: the better pixel-space baseline
    else:
        from dinokit.embedding import load_embeddings

        feats = load_embeddings(spec).features.numpy().astype(np.float32)
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    perm = np.random.default_rng(seed).permutation(len(feats))
    return feats[perm[n_queries:]], feats[perm[:n_queries]]


def run_size(n: int, n_queries: int, threads: int, log: list[dict[str, Any]],
             kinds: tuple[str, ...] = ("flat", "hnsw", "ivfpq"), features: str | None = None) -> None:
    set_num_threads(threads)
    t = time.perf_counter()
    if features is None:
        data = clustered(n + n_queries, seed=n)
        x, q = data[:n], data[n:]
        del data
    else:
        x, q = load_features(features, n_queries)
        n = len(x)
    print(f"\n## n={n:,} ({features or 'clustered'}, dim {x.shape[1]}): data ready in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    paths = [str(i) for i in range(n)]

    def record(kind: str, knobs: dict[str, Any], build_s: float, bpv: float, m: dict[str, Any]) -> None:
        row = {"n": n, "kind": kind, "knobs": knobs, "build_s": build_s, "bytes_per_vector": bpv, **m}
        log.append(row)
        print(json.dumps(row), flush=True)

    # exact baseline
    t = time.perf_counter()
    flat = Index.from_features(x, paths, kind="flat")
    build = time.perf_counter() - t
    truth = flat.search(q, k=10).ids
    m = measure(flat, q, truth, n_single=min(20, n_queries))
    record("flat", {}, build, file_bytes(flat) / n, m)
    del flat
    gc.collect()

    if "hnsw" in kinds:
        _hnsw(x, q, paths, truth, record)
    if "ivfpq" in kinds:
        _ivfpq(x, q, paths, truth, record)
    if "ivfpq-sq8" in kinds:
        _ivfpq(x, q, paths, truth, record, refine="sq8")


def _hnsw(x: np.ndarray, q: np.ndarray, paths: list[str], truth: np.ndarray, record: Any) -> None:
    # HNSW: one graph, several efSearch values
    n = len(x)
    t = time.perf_counter()
    hnsw = Index.from_features(x, paths, kind="hnsw", M=32, ef_construction=40)
    build = time.perf_counter() - t
    bpv = file_bytes(hnsw) / n
    for ef in (16, 32, 64, 128):
        m = measure(hnsw, q, truth, n_single=200, ef_search=ef)
        record("hnsw", {"M": 32, "ef_construction": 40, "ef_search": ef}, build, bpv, m)
    del hnsw
    gc.collect()


def _ivfpq(x: np.ndarray, q: np.ndarray, paths: list[str], truth: np.ndarray, record: Any,
           refine: str = "flat") -> None:
    # IVF-PQ with a float32 (or 8-bit) re-rank: one trained index, several nprobe / k_factor values
    n = len(x)
    t = time.perf_counter()
    ivf = Index.from_features(x, paths, kind="ivfpq", refine=refine)
    build = time.perf_counter() - t
    bpv = file_bytes(ivf) / n
    base = {k: ivf.knobs[k] for k in ("nlist", "pq_m", "refine")}
    for nprobe, kf in ((8, 8), (8, 16), (8, 32), (16, 16), (16, 32), (32, 32), (64, 64)):
        m = measure(ivf, q, truth, n_single=200, nprobe=nprobe, k_factor=kf)
        record("ivfpq", {**base, "nprobe": nprobe, "k_factor": kf}, build, bpv, m)
    del ivf
    gc.collect()


def markdown(log: list[dict[str, Any]]) -> str:
    lines = ["| n | kind | knobs | build s | bytes/vector | q/s batched | x exact | one query ms (median) "
             "| recall@10 |", "|---|---|---|---|---|---|---|---|---|"]
    exact = {r["n"]: r["qps_batched"] for r in log if r["kind"] == "flat"}
    for r in log:
        knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "-"
        lines.append(f"| {r['n']:,} | {r['kind']} | {knobs} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} "
                     f"| {r['qps_batched']:,.0f} | {r['qps_batched'] / exact[r['n']]:.1f} "
                     f"| {r['single_ms_median']:.2f} | {r['recall@10']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"],
                    help="kinds to measure: flat hnsw ivfpq ivfpq-sq8 (flat always runs: it is the baseline "
                    "and the ground truth)")
    ap.add_argument("--features", default=None,
                    help="real features instead of synthetic ones: a dinokit feature file or fashion-mnist")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    ap.add_argument("--add-cost", type=int, nargs="+", default=None, metavar="N",
                    help="instead: bytes written and ms per add of 10 vectors to a store of N items")
    ap.add_argument("--store-search", type=int, default=None, metavar="N",
                    help="instead: one-query latency with filters, removals and pending segments at N items")
    args = ap.parse_args()
    import faiss

    if args.store_search:
        set_num_threads(args.threads)
        rows = [r for kind in args.kinds for r in store_search(args.store_search, kind)]
        print("\n| n | kind | case | first query ms | median ms | p90 ms |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['n']:,} | {r['kind']} | {r['case']} | {r['first_ms']:.1f} | {r['median_ms']:.2f} "
                  f"| {r['p90_ms']:.2f} |")
        return
    if args.add_cost:
        set_num_threads(args.threads)
        rows = add_cost(args.add_cost)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        print("\n" + add_cost_markdown(rows))
        return

    print(f"faiss {faiss.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads", flush=True)
    log: list[dict[str, Any]] = []
    for n in args.sizes if args.features is None else [0]:
        run_size(n, args.queries, args.threads, log, tuple(args.kinds), args.features)
        if args.json:
            args.json.write_text(json.dumps(log, indent=1))
    print("\n" + markdown(log))


if __name__ == "__main__":
    main()
