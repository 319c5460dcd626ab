"""Benchmark: the full `dinokit embed` pipeline against a bare timm forward loop.

Pipeline: list a folder of JPEGs, decode (dinokit's default: background threads), resize 256 bicubic + crop 224 +
normalize, ViT-S/16 forward, write the .npz. Baseline: the same model and batch size over tensors
already in memory (no decoding, no resizing, no writing). Each config (--runtime: torch fp32, torch
bf16 autocast, onnxruntime fp32) has its bare loop and its pipeline; all run interleaved in this
process, so machine noise hits them alike; the medians of the per-round ratios are the result (goal
>= 0.9 of the same config's bare loop), and every config is also compared with bare torch fp32.

    .venv/bin/python benchmarks/embed.py --images 256 --batch-size 64 --rounds 3
    .venv/bin/python benchmarks/embed.py --runtime torch-fp32,onnx
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
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


def bare_loop(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> float:
    """Seconds for a plain forward over preprocessed in-memory tensors."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            forward(x[i:i + batch_size])
    return time.perf_counter() - t0


def bare_forward(model: torch.nn.Module, config: str, tmp: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bare model of a config: timm forward (bf16 autocast for torch-bf16) or the onnxruntime session."""
    if config == "onnx":
        from dinokit.onnx import OnnxFeatures

        return OnnxFeatures.for_model(model, "cls", 224)
    bf16 = config == "torch-bf16"

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x)

    return run


def pipeline_options(config: str) -> dict[str, str]:
    return {"runtime": "onnx", "precision": "auto"} if config == "onnx" else {
        "runtime": "torch", "precision": config.removeprefix("torch-")}


def pipeline(model: torch.nn.Module, folder: Path, out: Path, batch_size: int, workers: int | None,
             config: str) -> float:
    """Seconds for dinokit.embed on the folder plus writing the .npz."""
    from dinokit.embedding import embed

    t0 = time.perf_counter()
    emb = embed(model, folder, batch_size=batch_size, num_workers=workers, device="cpu", **pipeline_options(config))
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
    ap.add_argument("--runtime", default="auto",
                    help="comma list of torch-fp32, torch-bf16, onnx (auto: torch-fp32, torch-bf16 where the CPU "
                         "has native bf16, onnx where onnxruntime is installed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dinokit.devices import cpu_has_native_bf16, cpu_vector_extensions

    configs = args.runtime.split(",") if args.runtime != "auto" else (
        ["torch-fp32"] + (["torch-bf16"] if cpu_has_native_bf16() else [])
        + (["onnx"] if importlib.util.find_spec("onnxruntime") else []))
    model = random_vit_s16()
    base: dict[str, list[float]] = {c: [] for c in configs}
    pipe: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DINOKIT_CACHE", str(Path(tmp) / "cache"))  # a fresh export, as a first run does
        folder = Path(tmp) / "jpegs"
        make_jpegs(folder, args.images, args.image_px)
        x = torch.randn(args.images, 3, 224, 224)
        forwards = {c: bare_forward(model, c, Path(tmp)) for c in configs}  # the ONNX export happens here
        for c in configs:  # warm-up: allocator, kernels, and the pipeline's own first call
            bare_loop(forwards[c], x[: args.batch_size], args.batch_size)
        pipeline(model, folder, Path(tmp) / "f.npz", args.batch_size, args.workers, configs[-1])
        prep = preprocess_cost(model, folder)
        for r in range(args.rounds):  # interleaved: machine noise hits every config alike
            for c in configs:
                base[c].append(bare_loop(forwards[c], x, args.batch_size))
                pipe[c].append(pipeline(model, folder, Path(tmp) / "f.npz", args.batch_size, args.workers, c))
            print(f"round {r}: " + ", ".join(
                f"{c} bare {args.images / base[c][-1]:.1f} pipeline {args.images / pipe[c][-1]:.1f} img/s"
                for c in configs), flush=True)
    ref = configs[0]

    def med_ratio(num: list[float], den: list[float]) -> float:
        # each round runs all back to back, so its ratio sees the same machine load: use their median
        return statistics.median(n / d for n, d in zip(num, den, strict=True))

    decoding = (f"{args.workers} decode workers" if args.workers is not None
                else "decoding on background-priority threads, one batch ahead (dinokit's CPU default)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU flags: {cpu_vector_extensions()}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"{decoding}, torch {torch.__version__}, load avg {load:.1f} at the end")
    print(f"preprocessing: {1000 * prep:.1f} ms/image (decode + resize + crop + normalize, one core)")
    print(f"| config | bare img/s | pipeline img/s | pipeline / bare (same config) | bare / bare {ref} "
          f"| pipeline / bare {ref} | rounds (pipeline / bare same config) |")
    print("|---|---|---|---|---|---|---|")
    for c in configs:
        rounds = " ".join(f"{b / p:.2f}" for b, p in zip(base[c], pipe[c], strict=True))
        print(f"| {c} | {args.images / statistics.median(base[c]):.1f} | {args.images / statistics.median(pipe[c]):.1f} "
              f"| {med_ratio(base[c], pipe[c]):.2f} | {med_ratio(base[ref], base[c]):.2f} "
              f"| {med_ratio(base[ref], pipe[c]):.2f} | {rounds} |")
    print(f"\n{dt.date.today()}, ViT-S/16 224 px, {args.images} JPEGs {args.image_px}px, batch {args.batch_size}, "
          f"{platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()
