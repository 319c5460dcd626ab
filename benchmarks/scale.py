"""Benchmark: sharded embedding throughput with 1 and 2 processes under torchrun on this CPU.

Each run is `embed_to_folder` (the code behind `dinokit embed SRC --out DIR`) started by
`python -m torch.distributed.run --nproc_per_node P`: list a folder of JPEGs, split the shards over
the P ranks, decode in each rank's workers, ViT-S/16 forward, write parquet shards and the manifest.
The timer covers embed_to_folder only (model loaded, process group up), between two barriers.
Threads: each rank gets cores // P torch threads. The runs alternate for --rounds rounds; the
median images/s per process count is reported, and the 2-process features are compared with the
1-process ones (same shards and batches; only the thread count differs).

    .venv/bin/python benchmarks/scale.py --images 192 --rounds 2

Decode check (for a session with a GPU; the issue's embedding row for gpu_check.sh): one process,
ViT-S/16 and ViT-B/14 (random init, 224 px), Pillow decoding in workers vs `decode="device"`
(nvJPEG on CUDA), images/s of `embed()` over the same JPEG folder, one JSON line per row:

    .venv/bin/python benchmarks/scale.py --decode-check --device cuda --images 2048 --batch-size 256
    .venv/bin/python benchmarks/scale.py --decode-check --device cpu --images 16 --batch-size 8   # dry run

Index check (issue 19, "Indexes from shards"): N clustered 384-d vectors (default 10,000,000;
deterministic: 4096 centres in a 64-d latent space, projected to 384-d, plus isotropic noise, unit
norm) are streamed into a real sharded feature folder (npy shards of --shard-rows, written by
dinokit.shards), then `python -m dinokit.cli index build --features DIR --memory-budget 4GB` runs in
a subprocess so its peak RSS (ru_maxrss of the child) is its own. Then recall@10 of 1,000 held-out
queries against exact ground truth (faiss.knn shard by shard, merged) and queries/s (a batch of
1,000 and single queries), with --threads FAISS threads. One JSON line and a Markdown row:

    .venv/bin/python benchmarks/scale.py --index-check --vectors 200000    # minutes
    .venv/bin/python benchmarks/scale.py --index-check                     # 10M: ~32 GB of disk, hours
    .venv/bin/python benchmarks/scale.py --index-check --vectors 1000000 --memory-budget 400MB --compare-flat

The data (shards + index, ~3.2 KB per vector) goes under --workdir (default: a temp folder under
/tmp) and is removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

RUNNER = """
import json, sys, time
import torch
from dinokit import distributed, load
from dinokit.embedding import embed_to_folder
distributed.init_from_env()
model = load(sys.argv[1])
distributed.barrier()
t0 = time.perf_counter()
m = embed_to_folder(model, sys.argv[2], sys.argv[3], batch_size=int(sys.argv[4]), shard_size=int(sys.argv[5]),
                    device="cpu")
distributed.barrier()
dt = time.perf_counter() - t0
if distributed.is_main_process():
    print(json.dumps({"rows": m["rows"], "seconds": dt, "threads": torch.get_num_threads()}))
distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(nproc: int, model_dir: Path, images: Path, out: Path, batch_size: int, shard_size: int,
        runner: Path) -> dict:
    """One torchrun job; returns rank 0's JSON line plus images/s."""
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc)),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(runner), str(model_dir), str(images), str(out),
           str(batch_size), str(shard_size)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["images_per_s"] = row["rows"] / row["seconds"]
    return row


# ------------------------------------------------------------------------------ index from shards

LATENT, CENTRES = 64, 4096
# `python -m dinokit.cli ARGS` that prints its peak resident memory (VmHWM of /proc/self/status) at exit
HWM_RUNNER = """
import atexit, runpy, sys
def hwm():
    sys.stderr.write(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')))
atexit.register(hwm)
sys.argv = ['dinokit'] + sys.argv[1:]
runpy.run_module('dinokit.cli', run_name='__main__')
"""


def _clustered(rng_seed: int, n: int, dim: int, base_seed: int = 0) -> np.ndarray:
    """n unit vectors (n, dim) float32: latent clusters projected to ``dim`` plus noise (seeded)."""
    base = np.random.default_rng(base_seed)
    centres = base.standard_normal((CENTRES, LATENT)).astype(np.float32)
    proj = base.standard_normal((LATENT, dim)).astype(np.float32) / np.sqrt(LATENT)
    rng = np.random.default_rng(rng_seed)
    z = centres[rng.integers(0, CENTRES, n)] + 0.5 * rng.standard_normal((n, LATENT)).astype(np.float32)
    x = z @ proj + 0.1 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_feature_folder(folder: Path, n: int, dim: int, shard_rows: int) -> None:
    """A complete sharded feature folder (npy shards, manifest) of n clustered vectors, shard by shard."""
    from dinokit._io import write_json
    from dinokit.shards import plan_shards, write_shard

    folder.mkdir(parents=True)
    plan = plan_shards(n, shard_rows)
    records = []
    for i, (a, b) in enumerate(plan):
        x = _clustered(1000 + i, b - a, dim)
        records.append(write_shard(folder, i, len(plan), (a, b), x, [f"v/{j:09d}" for j in range(a, b)], {}, [],
                                   "npy"))
        del x
    write_json(folder / "manifest.json", {
        "format_version": 1, "inputs": {"kind": "synthetic", "spec": "clustered", "count": n},
        "model": {"model": "synthetic"}, "preprocessing": {}, "features": "cls", "feature_shape": [dim],
        "dtype": "float32", "format": "npy", "shard_size": shard_rows, "status": "complete", "world_size": 1,
        "rows": n, "skipped": [], "shards": records})


def ground_truth(folder: Path, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids (Q, k) of normalized queries over a feature folder, streamed shard by shard."""
    import faiss

    from dinokit.retrieval.stream import read_feature_manifest, shard_records
    from dinokit.shards import read_shard

    manifest = read_feature_manifest(folder)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for rec, offset in shard_records(manifest, None):
        x, _, _ = read_shard(folder, rec, manifest["feature_shape"])
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        s, i = faiss.knn(q, np.ascontiguousarray(x, np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
        both_s, both_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + offset], 1)
        order = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(both_s, order, 1), np.take_along_axis(both_i, order, 1)
        del x
    return best_i


def _build_child(work: Path, name: str, args: argparse.Namespace, *extra: str) -> dict:
    """`dinokit index build --features` in a child process: its info, build seconds and peak RSS."""
    import time

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # the child reports its own VmHWM at exit: ru_maxrss of a forked child starts at the parent's
    # RSS (Linux carries the pre-exec high-water mark across exec), so it cannot be used here
    cmd = [sys.executable, "-c", HWM_RUNNER, "index", "build", "--features", str(work / "feats"),
           "--out", str(work / name), "--threads", str(args.threads), "--json", *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    hwm = [line for line in res.stderr.splitlines() if line.startswith("VmHWM:")]
    info = json.loads(res.stdout)
    return {"kind": info["kind"], "knobs": info["knobs"], "build_s": round(seconds, 1),
            "peak_rss_gb": round(int(hwm[-1].split()[1]) * 1024 / 2**30, 3),
            "index_disk_gb": round(sum(f.stat().st_size for f in (work / name).iterdir()) / 2**30, 2)}


def _speed(index: object, q: np.ndarray, truth: np.ndarray) -> dict:
    """recall@10 and queries/s (one batch of all queries; 200 single queries) of an opened index."""
    import time

    t0 = time.perf_counter()
    got = index.search_vectors(q, 10).ids  # type: ignore[attr-defined]
    batch_qps = len(q) / (time.perf_counter() - t0)
    n_single = min(200, len(q))
    t0 = time.perf_counter()
    for i in range(n_single):
        index.search_vectors(q[i], 10)  # type: ignore[attr-defined]
    single_qps = n_single / (time.perf_counter() - t0)
    rec = float(np.mean([len(set(got[i]) & set(truth[i])) / 10 for i in range(len(q))]))
    return {"recall_at_10": round(rec, 4), "batch_qps": round(batch_qps, 1), "single_qps": round(single_qps, 1)}


def index_check(args: argparse.Namespace) -> None:
    """Build an index from a sharded folder of N synthetic vectors under a budget, in a subprocess;
    with --compare-flat also the same IVF-PQ with its float32 re-rank copy in RAM, timed alternately."""
    import shutil
    import statistics
    import time

    import faiss

    from dinokit.devices import cpu_vector_extensions
    from dinokit.retrieval.index import Index

    work = Path(tempfile.mkdtemp(prefix="dinokit-index-check-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        write_feature_folder(work / "feats", args.vectors, args.dim, args.shard_rows)
        gen_s = time.perf_counter() - t0
        built = {"budget": _build_child(work, "index", args, "--memory-budget", args.memory_budget)}
        if args.compare_flat:
            knobs = built["budget"]["knobs"]
            built["flat"] = _build_child(work, "index-flat", args, "--kind", "ivfpq", "--knob", "refine=flat",
                                         "--knob", f"nlist={knobs.get('nlist', 1)}", "--memory-budget", "1TB")
        q = _clustered(7, args.queries, args.dim)
        t0 = time.perf_counter()
        truth = ground_truth(work / "feats", q, 10)
        truth_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(args.threads)
        opened = {"budget": Index.load(work / "index", read_only=True)}
        if args.compare_flat:
            opened["flat"] = Index.load(work / "index-flat", read_only=True)
        for index in opened.values():
            index.search_vectors(q[:50], 10)  # warm-up: page in the index and the quantizer
        runs: dict[str, list[dict]] = {k: [] for k in opened}
        for _ in range(args.rounds if args.compare_flat else 1):  # alternating: same machine state
            for name, index in opened.items():
                runs[name].append(_speed(index, q, truth))
        for name, rs in runs.items():
            built[name].update({k: statistics.median(r[k] for r in rs) for k in rs[0]})
        row = {
            "check": "index_from_shards", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_vector_extensions(), "threads": args.threads, "vectors": args.vectors, "dim": args.dim,
            "shard_rows": args.shard_rows, "memory_budget": args.memory_budget, "generate_s": round(gen_s, 1),
            "ground_truth_s": round(truth_s, 1), **built["budget"],
        }
        if args.compare_flat:
            flat = built["flat"]
            row["flat_refine"] = flat
            row["qps_ratio_budget_vs_flat"] = {k: round(built["budget"][k] / flat[k], 3)
                                               for k in ("batch_qps", "single_qps")}
        print(json.dumps(row), flush=True)
        for name, b in built.items():
            print(f"| {args.vectors:,} | {args.memory_budget if name == 'budget' else 'none'} | {b['kind']} "
                  f"refine={b['knobs'].get('refine')} ondisk={b['knobs'].get('ondisk')} | {b['build_s']} s | "
                  f"{b['peak_rss_gb']} GB | {b['recall_at_10']} | {b['batch_qps']} | {b['single_qps']} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def decode_check(args: argparse.Namespace) -> None:
    """images/s of embed() with Pillow decoding in workers vs decoding on the device, two model sizes."""
    import time

    import torch
    from embed import make_jpegs

    from dinokit.embedding import embed, embed_precision
    from dinokit.models.backbone import create_backbone

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_jpegs(folder, args.images, args.size)
        for arch in ("vit_small_patch16_224", "vit_base_patch14_dinov2"):
            torch.manual_seed(0)
            model = create_backbone(arch, img_size=224).eval().to(args.device)
            for decode in ("cpu", "device"):
                embed(model, folder, batch_size=args.batch_size, device=args.device, decode=decode)  # warm-up
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                e = embed(model, folder, batch_size=args.batch_size, device=args.device, decode=decode)
                seconds = time.perf_counter() - t0
                print(json.dumps({"check": "embed_decode", "arch": arch, "decode": decode, "device": args.device,
                                  "images": len(e), "batch_size": args.batch_size, "jpeg_size": args.size,
                                  "precision": embed_precision(torch.device(args.device)),
                                  "images_per_s": round(len(e) / seconds, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--size", type=int, default=320, help="JPEG side in pixels")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decode-check", action="store_true", help="Pillow vs device decoding, one process")
    ap.add_argument("--device", default="cpu", help="for --decode-check: cuda or cpu")
    ap.add_argument("--index-check", action="store_true", help="index build from shards under a memory budget")
    ap.add_argument("--vectors", type=int, default=10_000_000, help="for --index-check")
    ap.add_argument("--dim", type=int, default=384, help="for --index-check")
    ap.add_argument("--shard-rows", type=int, default=500_000, help="for --index-check")
    ap.add_argument("--memory-budget", default="4GB", help="for --index-check")
    ap.add_argument("--queries", type=int, default=1000, help="for --index-check")
    ap.add_argument("--threads", type=int, default=2, help="for --index-check: FAISS threads")
    ap.add_argument("--workdir", default=None, help="for --index-check: where the data goes (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="for --index-check: keep the generated data")
    ap.add_argument("--compare-flat", action="store_true", help="for --index-check: also build the same IVF-PQ "
                    "with its float32 re-rank copy in RAM and time both alternately (--rounds rounds)")
    args = ap.parse_args()
    if args.decode_check:
        decode_check(args)
        return
    if args.index_check:
        index_check(args)
        return

    from embed import make_jpegs, random_vit_s16

    import dinokit
    from dinokit.devices import cpu_vector_extensions

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root / "images", args.images, args.size)
        model_dir = dinokit.save(random_vit_s16(), root / "vit_s16")
        runner = root / "runner.py"
        runner.write_text(RUNNER)
        rows: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(args.rounds):
            for nproc in (1, 2):
                out = root / f"out-{nproc}-{r}"
                rows[nproc].append(run(nproc, model_dir, root / "images", out, args.batch_size, args.shard_size,
                                       runner))
                print(f"round {r} nproc {nproc}: {rows[nproc][-1]['images_per_s']:.1f} images/s", flush=True)
        one = dinokit.load_embeddings(root / "out-1-0")
        two = dinokit.load_embeddings(root / "out-2-0")
        # 1 process runs 2 threads, 2 processes 1 thread each: kernels may split sums differently
        same = one.paths == two.paths
        diff = float((one.features - two.features).abs().max())
    med = {p: statistics.median(x["images_per_s"] for x in v) for p, v in rows.items()}
    print(json.dumps({
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_vector_extensions(), "cores": len(os.sched_getaffinity(0)),
        "images": args.images, "jpeg_size": args.size, "batch_size": args.batch_size,
        "shard_size": args.shard_size, "model": "ViT-S/16 (random init) 224 px",
        "images_per_s_1proc": round(med[1], 2), "images_per_s_2proc": round(med[2], 2),
        "speedup": round(med[2] / med[1], 3), "same_paths": same, "max_abs_feature_diff": diff,
    }, indent=2))


if __name__ == "__main__":
    main()
