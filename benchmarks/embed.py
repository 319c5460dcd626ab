"""Benchmark: the full `dinokit embed` pipeline against a bare timm forward loop.

Pipeline: list a folder of JPEGs, decode (worker processes), resize 256 bicubic + center crop 224 +
normalize, ViT-S/16 forward, write the .npz. Baseline: the same model and batch size over tensors
already in memory (no decoding, no resizing, no writing). Both run alternately in this process, so
machine noise hits both alike; the median of the per-round ratios is the result (goal >= 0.85).

    .venv/bin/python benchmarks/embed.py --images 256 --batch-size 64 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_jpegs(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """n smooth random colour images (size x size) saved as quality-90 JPEGs, like photos in cost."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        noise = rng.integers(-12, 13, (size, size, 3))
        arr = np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)


def random_vit_s16() -> torch.nn.Module:
    from dinokit.models.backbone import create_backbone

    torch.manual_seed(0)
    return create_backbone("vit_small_patch16_224").eval()


def bare_loop(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> float:
    """Seconds for a plain forward over preprocessed in-memory tensors."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    return time.perf_counter() - t0


def pipeline(model: torch.nn.Module, folder: Path, out: Path, batch_size: int, workers: int | None) -> float:
    """Seconds for dinokit.embed on the folder plus writing the .npz."""
    from dinokit.embedding import embed

    t0 = time.perf_counter()
    emb = embed(model, folder, batch_size=batch_size, num_workers=workers, device="cpu")
    emb.save(out)
    elapsed = time.perf_counter() - t0
    assert len(emb) == len(list(folder.glob("*.jpg"))) and not emb.skipped
    return elapsed


def preprocess_cost(model: torch.nn.Module, folder: Path, n: int = 64) -> float:
    """Seconds per image to decode + resize + crop + normalize on one thread, as in a DataLoader worker."""
    from dinokit.data.images import ImageDataset, list_images
    from dinokit.data.transforms import eval_transform

    ds = ImageDataset(list_images(folder)[:n], eval_transform(model))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run torch on one thread
    try:
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        return (time.perf_counter() - t0) / len(ds)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--image-px", type=int, default=320, help="side of the generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: dinokit's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dinokit.embedding import default_num_workers

    model = random_vit_s16()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        make_jpegs(folder, args.images, args.image_px)
        x = torch.randn(args.images, 3, 224, 224)
        with torch.inference_mode():  # warm-up: allocator, kernels
            model(x[: args.batch_size])
        prep = preprocess_cost(model, folder)
        base, pipe = [], []
        for r in range(args.rounds):
            base.append(bare_loop(model, x, args.batch_size))
            pipe.append(pipeline(model, folder, Path(tmp) / "f.npz", args.batch_size, args.workers))
            print(f"round {r}: bare {args.images / base[-1]:.1f} img/s, "
                  f"pipeline {args.images / pipe[-1]:.1f} img/s, ratio {base[-1] / pipe[-1]:.3f}", flush=True)
    b_ips, p_ips = args.images / statistics.median(base), args.images / statistics.median(pipe)
    # Each round runs both back to back, so its ratio sees the same machine load: use their median.
    ratio = statistics.median(b / p for b, p in zip(base, pipe, strict=True))
    workers = args.workers if args.workers is not None else default_num_workers()
    print(f"preprocessing    : {1000 * prep:.1f} ms/image (decode + resize + crop + normalize, one core)")
    print(f"model            : {1000 / b_ips:.1f} ms/image")
    print(f"bare timm loop   : {b_ips:.1f} images/s (median of {args.rounds})")
    print(f"dinokit pipeline : {p_ips:.1f} images/s (median of {args.rounds})")
    print(f"ratio            : {ratio:.3f} (median of per-round ratios; goal >= 0.85)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"load avg {load:.1f} at the end")
    print("\nRESULTS.md row:")
    print(f"| {dt.date.today()} | ViT-S/16 224 px, {args.images} JPEGs {args.image_px}px, batch {args.batch_size}, "
          f"{workers} workers, {torch.get_num_threads()} threads | {b_ips:.1f} | {p_ips:.1f} | "
          f"{ratio:.2f} | {machine} |")


if __name__ == "__main__":
    main()
