"""Training throughput: dinokit's loop against a plain official-style loop, back to back.

Configurations (CPU):
- ``fmnist``: ViT patch 4, width 192, depth 6, 3 heads, out_dim 4096, batch 128, 2x32 + 6x16 crops,
  Fashion-MNIST images.
- ``vits16``: ViT-S/16, out_dim 65536, batch 16, 2x224 + 8x96 crops, random 256x256 images.

Modes:
- ``official``: per-image PIL multi-crop (the official transform chain), fp32, the official loss
  (python loop over view pairs), per-parameter clipping with ``.item()``, per-parameter EMA.
- ``dinokit-fp32`` / ``dinokit-bf16``: batched tensor multi-crop, the dinokit training step
  (foreach clip/EMA, fused loss), fp32 or bf16 autocast; with bf16 on CPU the loop's default of
  plain-matmul attention instead of timm's fused kernel (whose CPU backward is slow in bf16).

Each (config, mode) runs in its own subprocess (so the peak RSS is its own), with warm-up
iterations excluded; modes are interleaved over ``--rounds`` rounds so machine-load drift hits all
alike. Augmentation and model time are measured separately (the model step is timed on
pre-augmented batches). Prints a JSON summary and a markdown table.

    .venv/bin/python benchmarks/train_throughput.py --config fmnist --iters 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "fmnist": {
        "model.arch": "vit_small_patch16_224",
        "model.model_args": {"patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3, "img_size": 32},
        "model.out_dim": 4096, "optim.batch_size_per_gpu": 128, "data.global_crops_size": 32,
        "data.local_crops_size": 16, "data.local_crops_number": 6, "data.source": "fashion-mnist",
    },
    "vits16": {
        "model.arch": "vit_small_patch16_224", "model.out_dim": 65536, "optim.batch_size_per_gpu": 16,
        "data.global_crops_size": 224, "data.local_crops_size": 96, "data.local_crops_number": 8,
        "data.source": "random-256",
    },
}


def _images(config: str, n: int) -> Any:
    import numpy as np

    if config == "fmnist":
        from dinokit.data.fashion_mnist import load_fashion_mnist

        x, _ = load_fashion_mnist("train", limit=n)
        return np.array(x)  # (n, 28, 28) uint8
    rng = np.random.default_rng(0)
    # smooth random images (not white noise) so JPEG-like statistics do not matter; 256 px RGB
    base = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 16, axis=1), 16, axis=2)


def worker(config: str, mode: str, iters: int, threads: int) -> dict[str, Any]:
    """Time augmentation and model steps of one mode; returns per-iteration seconds and peak RSS."""
    import torch
    from PIL import Image

    from dinokit.data.multicrop import MultiCropSpec, PILMultiCrop, TensorMultiCrop
    from dinokit.training.config import TrainConfig
    from dinokit.training.ema import ema_update_
    from dinokit.training.loss import DINOLoss
    from dinokit.training.models import build_models
    from dinokit.training.optim import (
        build_optimizer,
        cancel_last_layer_gradients,
        clip_gradients,
        set_schedules,
    )
    from dinokit.training.precision import autocast, set_fused_attention, use_fused_attention

    torch.set_num_threads(threads)
    cfg = TrainConfig().replace(CONFIGS[config])
    b = cfg.optim.batch_size_per_gpu
    spec = MultiCropSpec.from_config(cfg.data)
    ncrops = spec.ncrops
    images = _images(config, b * (iters + 1))
    torch.manual_seed(0)
    student, teacher = build_models(cfg)
    optimizer = build_optimizer(student)
    set_schedules(optimizer, 1e-4, 0.04)
    loss_fn = DINOLoss(cfg.model.out_dim, ncrops, 0.04, 0.04, 0, 100)
    sp, tp = list(student.parameters()), list(teacher.parameters())

    # ---- augmentation
    aug_times, batches = [], []
    if mode == "official":
        pil = PILMultiCrop(spec)
        gen = torch.Generator().manual_seed(0)
        for i in range(iters + 1):
            t0 = time.perf_counter()
            per_image = [pil(Image.fromarray(images[i * b + j]), gen) for j in range(b)]
            crops = [torch.stack(v) for v in zip(*per_image, strict=True)]
            aug_times.append(time.perf_counter() - t0)
            batches.append(crops)
    else:
        tm = TensorMultiCrop(spec)
        x = torch.from_numpy(images)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
        for i in range(iters + 1):
            gen = torch.Generator().manual_seed(i)
            t0 = time.perf_counter()
            crops = tm(x[i * b:(i + 1) * b], gen)
            aug_times.append(time.perf_counter() - t0)
            batches.append(crops)

    # ---- model steps
    precision = "bf16" if mode == "dinokit-bf16" else "fp32"
    dev = torch.device("cpu")
    if mode != "official":  # the loop's attention choice (plain matmuls for bf16 on CPU)
        fused = use_fused_attention(cfg, dev, precision)
        set_fused_attention(student, fused)
        set_fused_attention(teacher, fused)
    step_times = []
    for i, crops in enumerate(batches):
        t0 = time.perf_counter()
        if mode == "official":
            _official_step(student, teacher, crops, optimizer, loss_fn)
        else:
            with autocast(dev, precision):
                with torch.no_grad():
                    t_out = teacher(crops[:2])
                s_out = student(crops)
            loss = loss_fn(s_out, t_out, 0)
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(student, 3.0)
            cancel_last_layer_gradients(student, 1, 1)
            optimizer.step()
            ema_update_(tp, sp, 0.996)
        if i > 0:  # the first iteration warms up allocators and kernels
            step_times.append(time.perf_counter() - t0)
    aug = aug_times[1:]
    return {
        "config": config, "mode": mode, "batch": b, "threads": threads,
        "aug_s": aug, "step_s": step_times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _official_step(student: Any, teacher: Any, crops: list[Any], optimizer: Any, loss_fn: Any) -> None:
    """The official train_one_epoch body: fp32, explicit loss loop, per-parameter clip and EMA."""
    import torch
    import torch.nn.functional as F

    teacher_output = teacher(crops[:2])
    student_output = student(crops)
    # official DINOLoss.forward
    s = (student_output / loss_fn.student_temp).chunk(loss_fn.ncrops)
    t = F.softmax((teacher_output - loss_fn.center) / 0.04, dim=-1).detach().chunk(2)
    total, n = 0, 0
    for iq, q in enumerate(t):
        for v in range(len(s)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    loss = total / n
    loss_fn.update_center(teacher_output)
    if not torch.isfinite(torch.tensor(loss.item())):
        raise FloatingPointError("non-finite loss")
    optimizer.zero_grad()
    loss.backward()
    for p in student.parameters():  # official clip_gradients
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            _ = norm.item()
            coef = 3.0 / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)
    optimizer.step()
    with torch.no_grad():
        for q, k in zip(student.parameters(), teacher.parameters(), strict=True):
            k.data.mul_(0.996).add_((1 - 0.996) * q.detach().data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="fmnist")
    ap.add_argument("--modes", default="official,dinokit-fp32,dinokit-bf16")
    ap.add_argument("--iters", type=int, default=4, help="timed iterations per run (plus 1 warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.iters, args.threads)))
        return
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            out = subprocess.run([sys.executable, __file__, "--worker", args.config, m, "--iters", str(args.iters),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for m in modes:
        aug = statistics.median(t for r in runs[m] for t in r["aug_s"])
        step = statistics.median(t for r in runs[m] for t in r["step_s"])
        b = runs[m][0]["batch"]
        rows.append({"mode": m, "aug_s_per_batch": aug, "model_s_per_batch": step,
                     "images_per_s": b / (aug + step), "model_images_per_s": b / step,
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[m])})
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["images_per_s"] / base
    print(json.dumps({"config": args.config, "iters": args.iters, "rounds": args.rounds, "threads": args.threads,
                      "rows": rows}, indent=2))
    print(f"\n| config | mode | aug s/batch | model s/batch | img/s (aug+model) | model-only img/s | peak RSS MB | x {modes[0]} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {args.config} | {r['mode']} | {r['aug_s_per_batch']:.3f} | {r['model_s_per_batch']:.3f} | "
              f"{r['images_per_s']:.1f} | {r['model_images_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['speedup_vs_first']:.2f} |")


if __name__ == "__main__":
    main()
