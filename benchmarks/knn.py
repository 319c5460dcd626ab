"""k-NN evaluation speed: dinokit vs the official chunked algorithm vs scikit-learn.

60,000 x 384 train features against 10,000 x 384 test features, 10 classes, k in {10, 20, 100, 200}.
The features are Fashion-MNIST pixels (centered) through a fixed random projection to 384-d, so the
neighbourhoods are as clustered as real image features (pure Gaussian noise would not be).

Methods, all timed in this one process, back to back, best of ``--repeat`` (the CPU is shared):

- ``dinokit``: :func:`dinokit.eval.knn.knn_classify_multi` (auto precision: certified bf16 + exact
  re-rank on CPUs with AVX-512 BF16), one search for the four k.
- ``dinokit fp32`` and ``dinokit faiss``: the other exact search paths.
- ``official-style``: DINO's ``knn_classifier`` written plainly: 100 test chunks, fp32 similarity,
  one top-200, then the one-hot weighted vote for each k.
- ``scikit-learn``: ``KNeighborsClassifier(metric="cosine", weights="distance", algorithm="brute")``,
  fit + predict for each k (its vote weights are 1/distance, so only its time is comparable).

- ``dinokit fp32 torch.topk``: the fp32 path with ``torch.topk`` instead of the fused numba selection
  (what the fp32 path ran before; for the record).

The floor: the similarity matmul's FLOPs, 2 x 60,000 x 10,000 x 384 = 460.8 GFLOP, at the fp32 GEMM
peak (``torch.matmul`` 4096^3, the same threads) measured in this process at the start of every round;
each method's time is printed as a multiple of the floor of its own round. (On CPUs with native bf16
the certified bf16 search can go below the fp32 floor: its matmul runs at the bf16 peak.)

``--profile`` also prints where one dinokit search spends its time, stage by stage.

Run: ``.venv/bin/python benchmarks/knn.py [--repeat 3] [--no-sklearn] [--profile]``
"""

from __future__ import annotations

import argparse
import time

import _machine
import numpy as np
import torch
import torch.nn.functional as F

from dinokit.data.fashion_mnist import load_fashion_mnist
from dinokit.devices import cpu_has_native_bf16
from dinokit.eval import knn as knn_module
from dinokit.eval.knn import knn_classify_multi

KS = (10, 20, 100, 200)


def make_features(dim: int = 384, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(784, dim, generator=g) / 28
    tr = torch.from_numpy(xtr.reshape(len(xtr), -1).astype(np.float32)) / 255
    te = torch.from_numpy(xte.reshape(len(xte), -1).astype(np.float32)) / 255
    mean = tr.mean(0)
    return (tr - mean) @ proj, torch.from_numpy(ytr), (te - mean) @ proj, torch.from_numpy(yte)


@torch.no_grad()
def official_style(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, ks: tuple[int, ...], T: float = 0.07, num_classes: int = 10
                   ) -> dict[int, tuple[float, float]]:
    """The official algorithm, one top-max(k) per chunk and one vote per k (100 chunks, fp32)."""
    train_t = F.normalize(train_features, dim=1).t()
    test_n = F.normalize(test_features, dim=1)
    kmax = max(ks)
    n = test_labels.shape[0]
    per_chunk = n // 100
    hits = {k: [0, 0] for k in ks}
    for start in range(0, n, per_chunk):
        feats = test_n[start:start + per_chunk]
        targets = test_labels[start:start + per_chunk]
        b = targets.shape[0]
        sims, idx = (feats @ train_t).topk(kmax, largest=True, sorted=True)
        neighbours = torch.gather(train_labels.view(1, -1).expand(b, -1), 1, idx)
        for k in ks:
            one_hot = torch.zeros(b * k, num_classes).scatter_(1, neighbours[:, :k].reshape(-1, 1), 1)
            weights = (sims[:, :k] / T).exp()
            probs = (one_hot.view(b, k, num_classes) * weights.view(b, k, 1)).sum(1)
            _, pred = probs.sort(1, True)
            correct = pred.eq(targets.view(-1, 1))
            hits[k][0] += int(correct[:, :1].sum())
            hits[k][1] += int(correct[:, :5].sum())
    return {k: (100.0 * h[0] / n, 100.0 * h[1] / n) for k, h in hits.items()}


def sklearn_knn(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, ks: tuple[int, ...]
                ) -> dict[int, float]:
    from sklearn.neighbors import KNeighborsClassifier

    out = {}
    for k in ks:
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance", algorithm="brute")
        clf.fit(xtr, ytr)
        out[k] = 100.0 * float((clf.predict(xte) == yte).mean())
    return out


def timed(fn, *args, **kwargs):
    t, c = time.perf_counter(), time.process_time()
    res = fn(*args, **kwargs)
    timed.cpu = time.process_time() - c  # CPU seconds: with 1 thread, a proxy for an idle machine's wall time
    return time.perf_counter() - t, res


def profile_stages(run) -> dict[str, float]:
    """Seconds spent in each stage of one ``run()``: wraps the search's helpers and ``torch.mm``."""
    spent: dict[str, float] = {}
    stages = ["_rows", "_candidates", "_pair_dots", "_sort_desc", "_exact_topk", "_merge"]
    saved = {name: getattr(knn_module, name) for name in stages}
    mm = torch.mm

    def wrap(name, fn):
        def inner(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return inner

    try:
        for name, fn in saved.items():
            setattr(knn_module, name, wrap(name, fn))
        torch.mm = wrap("matmul (torch.mm)", mm)
        t = time.perf_counter()
        run()
        spent["total"] = time.perf_counter() - t
    finally:
        torch.mm = mm
        for name, fn in saved.items():
            setattr(knn_module, name, fn)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--methods", default="", help="comma list of method names to run (default: all)")
    ap.add_argument("--profile", action="store_true", help="time each stage of one dinokit search")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = make_features()
    info = _machine.machine_info(args.threads)
    print(f"{info['utc']} UTC, {info['cpu']} ({info['flags']}), torch {info['torch']}, load avg "
          f"{info['load_avg_1min']:.1f}")
    print(f"train {tuple(xtr.shape)}, test {tuple(xte.shape)}, k {KS}, threads {args.threads}")
    flop = 2.0 * xtr.shape[0] * xte.shape[0] * xtr.shape[1]

    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    floor_x: dict[str, float] = {}
    results: dict[str, dict] = {}
    peaks: list[float] = []
    methods = {
        "dinokit": lambda: knn_classify_multi(xtr, ytr, xte, yte, ks=KS),
        "official-style": lambda: official_style(xtr, ytr, xte, yte, KS),
        "dinokit fp32": lambda: knn_classify_multi(xtr, ytr, xte, yte, ks=KS, precision="fp32"),
        "dinokit fp32 torch.topk": lambda: _without_fused(
            lambda: knn_classify_multi(xtr, ytr, xte, yte, ks=KS, precision="fp32")),
        "dinokit faiss": lambda: knn_classify_multi(xtr, ytr, xte, yte, ks=KS, backend="faiss"),
    }
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods.split(",") or k == "official-style"}
    t = time.perf_counter()
    knn_classify_multi(xtr[:8192], ytr[:8192], xte[:64], yte[:64], ks=KS, precision="fp32")
    if cpu_has_native_bf16():
        knn_classify_multi(xtr[:8192], ytr[:8192], xte[:64], yte[:64], ks=KS, precision="bf16")
    print(f"first calls (load or compile the numba selection kernels): {time.perf_counter() - t:.2f} s")
    for _ in range(args.repeat):  # interleaved, so a noisy neighbour hurts every method alike
        peak = _machine.gemm_gflops()  # this round's fp32 GEMM peak, next to its figures
        peaks.append(peak)
        floor = flop / (peak * 1e9)
        for name, fn in methods.items():
            dt, res = timed(fn)
            best[name] = min(best.get(name, float("inf")), dt)
            cpu[name] = min(cpu.get(name, float("inf")), timed.cpu)
            floor_x[name] = min(floor_x.get(name, float("inf")), dt / floor)
            results[name] = res
    if not args.no_sklearn:
        best["scikit-learn"], results["scikit-learn"] = timed(sklearn_knn, xtr.numpy(), ytr.numpy(), xte.numpy(),
                                                              yte.numpy(), KS)
    _report(args, best, cpu, floor_x, results, peaks, flop, methods.get("dinokit"))


def _without_fused(run):
    """Run ``run()`` with the numba selection kernels disabled (torch.topk / torch selection)."""
    from dinokit.eval import _topk_cpu

    saved = _topk_cpu.nb
    _topk_cpu.nb = None
    try:
        return run()
    finally:
        _topk_cpu.nb = saved


def _report(args, best, cpu, floor_x, results, peaks, flop, run_dinokit) -> None:
    if args.profile and run_dinokit is not None:
        spent = profile_stages(run_dinokit)
        print("dinokit stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in spent.items()))
    lo, hi = min(peaks), max(peaks)
    print(f"fp32 GEMM peak (torch.matmul 4096^3, {args.threads} threads), per round: "
          + ", ".join(f"{p:.0f}" for p in peaks) + " GFLOP/s")
    print(f"floor: {flop / 1e9:.1f} GFLOP similarity matmul at that peak = {flop / hi / 1e9:.2f}-"
          f"{flop / lo / 1e9:.2f} s")
    if cpu_has_native_bf16():
        bf = _machine.gemm_gflops(dtype=torch.bfloat16)
        print(f"(bf16 GEMM peak now: {bf:.0f} GFLOP/s; the same matmul in bf16: {flop / bf / 1e9:.2f} s)")
    official = results["official-style"]
    for name in best:
        if name in ("official-style", "scikit-learn"):
            continue
        top1 = {k: results[name][k]["top1"] for k in KS}
        same = all(abs(top1[k] - official[k][0]) < 1e-9 and abs(results[name][k]["top5"] - official[k][1]) < 1e-9
                   for k in KS)
        print(f"{name:26s} {best[name]:7.2f} s (cpu {cpu[name]:6.2f} s, {floor_x[name]:.2f}x the floor = "
              f"{100 / floor_x[name]:.0f}% of the fp32 GEMM peak)  top-1 "
              f"{top1}  same top-1 and top-5 as official: {same}")
    print(f"{'official-style':26s} {best['official-style']:7.2f} s (cpu {cpu['official-style']:6.2f} s, "
          f"{floor_x['official-style']:.2f}x the floor = {100 / floor_x['official-style']:.0f}% of the fp32 GEMM peak)"
          f"  top-1 { {k: v[0] for k, v in official.items()} }")
    if "scikit-learn" in best:
        print(f"{'scikit-learn':26s} {best['scikit-learn']:7.2f} s  top-1 (1/distance vote) {results['scikit-learn']}")
    for name in best:
        if name != "dinokit" and "dinokit" in best:
            extra = f" (cpu time {cpu[name] / cpu['dinokit']:.1f}x)" if name in cpu else ""
            print(f"dinokit is {best[name] / best['dinokit']:.1f}x faster than {name}{extra}")


if __name__ == "__main__":
    main()
