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

TODO(index store): the issue's 10M-vector (clustered, 384-d) index build under a 4 GB budget
(build time, peak RSS, recall@10, queries/s) belongs here once `dinokit index build --features DIR
--memory-budget` exists (the index-store work); it will stream `dinokit.iter_embeddings(DIR)`.
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

import torch

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


def decode_check(args: argparse.Namespace) -> None:
    """images/s of embed() with Pillow decoding in workers vs decoding on the device, two model sizes."""
    import time

    from embed import make_jpegs

    from dinokit.embedding import embed
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
    args = ap.parse_args()
    if args.decode_check:
        decode_check(args)
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
