"""Training throughput: dinokit's step against the REAL official DINO step, and against the GEMM peak.

Configurations (CPU), the same model, crops and batch in every mode:
- ``fmnist``: ViT patch 4, width 192, depth 6, 3 heads, out_dim 4096, batch 128, 2x32 + 6x16 crops,
  Fashion-MNIST images.
- ``vits16``: ViT-S/16, out_dim 65536, batch 16, 2x224 + 8x96 crops, random smooth 256x256 images.

Modes:
- ``official``: facebookresearch/dino's own ``main_dino.train_one_epoch`` with its DINOLoss,
  MultiCropWrapper, DINOHead, ViT, DDP student, ``utils.clip_gradients``,
  ``cancel_gradients_last_layer`` and ``DataAugmentationDINO``, imported unchanged from the snapshot
  folder given by ``--official-repo`` (see ``benchmarks/official_dino.py``; never committed here).
- ``official-reimpl``: "official-style (re-implemented)": the earlier stand-in (dinokit's timm model
  and PIL multi-crop, the official loss loop, per-parameter clip with ``.item()`` and EMA). Kept as a
  labelled extra only; it is NOT the official code (it ran 1.37x faster than it on an AVX2 CPU).
- ``dinokit``: dinokit's own ``TrainState``/``step`` with its defaults on this CPU: precision "auto"
  (``dinokit.training.precision.choose_precision``: fp32 at once on CPUs without native bf16, else a
  short fp32/bf16 probe), the attention choice of ``TrainState.prepare``, batched tensor multi-crop.
- ``dinokit-fp32`` / ``dinokit-bf16``: the same step with the precision forced; ``dinokit-fp32-compile``: fp32
  with both backbones through ``torch.compile`` (the config's ``compile: true``; its first steps compile).

Each (config, mode) runs in its own subprocess (peak RSS is its own); modes are interleaved over
``--rounds`` rounds so that machine-load drift hits all alike. Augmentation and model step are timed
separately (the step runs on pre-augmented batches); img/s = batch / (aug + step). The first
``--warmup`` steps of every run (3) are not timed: the first runs under ``FlopCounterMode``, which
gives the FLOPs of the step (matmuls/convolutions/attention of teacher forward, student forward and
backward), and the next ones let glibc's malloc settle (its mmap threshold adapts over the first
steps; with a single warm-up step the timed ones included seconds of page faults, official and
dinokit alike). The fp32
GEMM peak (``torch.matmul`` 4096^3, same threads) is measured in the same process before and after the
timed steps; ``% peak`` = step FLOPs / step time / mean peak. ``--profile`` splits the step by stage.

    .venv/bin/python benchmarks/train_throughput.py --config fmnist --official-repo /tmp/dino-official \\
        --modes official,dinokit,dinokit-fp32 --iters 3 --rounds 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from typing import Any

import _machine

CONFIGS: dict[str, dict[str, Any]] = {
    "fmnist": {
        "model.arch": "vit_small_patch16_224",
        "model.model_args": {"patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3, "img_size": 32},
        "model.out_dim": 4096, "optim.batch_size_per_gpu": 128, "data.global_crops_size": 32,
        "data.local_crops_size": 16, "data.local_crops_number": 6, "data.source": "fashion-mnist",
    },
    "tiny": {  # a smoke test of the script's plumbing, not a measurement
        "model.arch": "vit_small_patch16_224",
        "model.model_args": {"patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 32},
        "model.out_dim": 256, "optim.batch_size_per_gpu": 8, "data.global_crops_size": 32,
        "data.local_crops_size": 16, "data.local_crops_number": 2, "data.source": "fashion-mnist",
    },
    "vits16": {
        "model.arch": "vit_small_patch16_224", "model.out_dim": 65536, "optim.batch_size_per_gpu": 16,
        "data.global_crops_size": 224, "data.local_crops_size": 96, "data.local_crops_number": 8,
        "data.source": "random-256",
    },
}
OFFICIAL_VIT = {  # the same ViTs in the official code's terms
    "fmnist": {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3},
    "tiny": {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3},
    "vits16": {"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
}
LABELS = {"official": "official (real facebookresearch/dino code)",
          "official-reimpl": "official-style (re-implemented)", "dinokit": "dinokit (defaults)",
          "dinokit-fp32": "dinokit fp32", "dinokit-bf16": "dinokit bf16",
          "dinokit-fp32-compile": "dinokit fp32, torch.compile (inductor CPU)"}
STAGES = ("teacher fwd", "student fwd", "loss", "backward", "clip", "optimizer", "EMA", "other")


def _images(config: str, n: int) -> Any:
    import numpy as np

    if config in ("fmnist", "tiny"):
        from dinokit.data.fashion_mnist import load_fashion_mnist

        x, _ = load_fashion_mnist("train", limit=n)
        return np.array(x)  # (n, 28, 28) uint8
    rng = np.random.default_rng(0)
    # smooth random images (not white noise) so JPEG-like statistics do not matter; 256 px RGB
    base = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 16, axis=1), 16, axis=2)


def _pil_batches(transform: Callable[[Any], list[Any]], images: Any, b: int, n: int) -> tuple[list[Any], list[float]]:
    """Per-image PIL multi-crop (as the official DataLoader workers) collated view by view."""
    import torch
    from PIL import Image

    batches, times = [], []
    for i in range(n):
        t0 = time.perf_counter()
        per_image = [transform(Image.fromarray(images[i * b + j]).convert("RGB")) for j in range(b)]
        batches.append([torch.stack(v) for v in zip(*per_image, strict=True)])
        times.append(time.perf_counter() - t0)
    return batches, times


class Stopwatch:
    """Seconds per stage, accumulated over the timed steps."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.on = False

    def add(self, stage: str, seconds: float) -> None:
        if self.on:
            self.spent[stage] = self.spent.get(stage, 0.0) + seconds

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(stage, time.perf_counter() - t)
        return inner


# ------------------------------------------------------------------------------ the real official step
def run_official(config: str, iters: int, warmup: int, repo: str, profile: bool) -> dict[str, Any]:
    """Augmentation and ``train_one_epoch`` steps of the official code (imported from ``repo``)."""
    import random

    import numpy as np
    import official_dino
    import torch

    from dinokit.training.config import TrainConfig

    cfg = TrainConfig().replace(CONFIGS[config])
    d, b = cfg.data, cfg.optim.batch_size_per_gpu
    off = official_dino.load(repo)
    random.seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    aug = official_dino.augmentation(off, tuple(d.global_crops_scale), tuple(d.local_crops_scale),
                                     d.local_crops_number, d.global_crops_size, d.local_crops_size)
    n = warmup + iters
    batches, aug_times = _pil_batches(aug, _images(config, b * n), b, n)
    out: dict[str, Any] = {"aug_s": aug_times[warmup:], "official_commit": off.commit}
    watch = Stopwatch()
    with official_dino.cpu_shims(off), redirect_stdout(sys.stderr):  # its MetricLogger prints
        parts = official_dino.build(off, OFFICIAL_VIT[config], cfg.model.out_dim, 2 + d.local_crops_number, b,
                                    iters_per_epoch=max(iters, warmup))
        if profile:
            _instrument_official(off, parts, watch)
        warm = official_dino.TimedLoader(batches[:1])
        _, out["step_flops"] = _machine.count_flops(lambda: official_dino.train_epoch(off, parts, warm))
        if warmup > 1:
            official_dino.train_epoch(off, parts, official_dino.TimedLoader(batches[1:warmup]))
        loader = official_dino.TimedLoader(batches[warmup:])
        watch.on = True
        with _machine.peak_around(out):
            official_dino.train_epoch(off, parts, loader)
        watch.on = False
    out["step_s"], out["step_cpu_s"] = loader.step_times(), loader.step_times(cpu=True)
    if profile:
        watch.spent["other"] = sum(out["step_s"]) - sum(watch.spent.values())  # EMA loop + logging
        out["stages_s"] = {k: v / iters for k, v in watch.spent.items()}
    return out


def _instrument_official(off: Any, parts: dict[str, Any], watch: Stopwatch) -> None:
    """Time the official parts by wrapping them (the loop itself is untouched); EMA lands in "other"."""
    import torch

    parts["teacher"].forward = watch.wrap("teacher fwd", parts["teacher"].forward)
    parts["student"].forward = watch.wrap("student fwd", parts["student"].forward)
    parts["dino_loss"].forward = watch.wrap("loss", parts["dino_loss"].forward)
    parts["optimizer"].step = watch.wrap("optimizer", parts["optimizer"].step)
    off.utils.clip_gradients = watch.wrap("clip", off.utils.clip_gradients)
    torch.Tensor.backward = watch.wrap("backward", torch.Tensor.backward)  # type: ignore[method-assign]


# ------------------------------------------------------------------------------ dinokit and the re-implementation
def run_dinokit(config: str, mode: str, iters: int, warmup: int, profile: bool) -> dict[str, Any]:
    """Augmentation and steps of dinokit's own ``TrainState``/``step`` (or of the re-implementation)."""
    import torch

    from dinokit.data.multicrop import MultiCropSpec, PILMultiCrop, TensorMultiCrop
    from dinokit.training.config import TrainConfig
    from dinokit.training.models import build_models

    cfg = TrainConfig().replace(CONFIGS[config])
    b = cfg.optim.batch_size_per_gpu
    spec = MultiCropSpec.from_config(cfg.data)
    n = warmup + iters
    images = _images(config, b * n)
    torch.manual_seed(0)
    student, teacher = build_models(cfg)
    watch = Stopwatch()
    if mode == "official-reimpl":
        gen = torch.Generator().manual_seed(0)
        pil = PILMultiCrop(spec)
        batches, aug_times = _pil_batches(lambda im: pil(im, gen), images, b, n)
        run, precision = _reimpl_runner(cfg, student, teacher, spec.ncrops, watch), "fp32"
    else:
        tm = TensorMultiCrop(spec)
        x = torch.from_numpy(images)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
        batches, aug_times = [], []
        for i in range(n):
            t0 = time.perf_counter()
            batches.append(tm(x[i * b:(i + 1) * b], torch.Generator().manual_seed(i)))
            aug_times.append(time.perf_counter() - t0)
        run, precision = _dinokit_runner(cfg, mode, student, teacher, n)
    out: dict[str, Any] = {"aug_s": aug_times[warmup:], "precision": precision}
    if profile and mode != "official-reimpl":
        _instrument_dinokit(run, watch)
    _, out["step_flops"] = _machine.count_flops(lambda: run(batches[0]))
    for crops in batches[1:warmup]:
        run(crops)
    times, cpu = [], []
    watch.on = True
    with _machine.peak_around(out):
        for crops in batches[warmup:]:
            t0, c0 = time.perf_counter(), time.process_time()
            run(crops)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    watch.on = False
    out["step_s"], out["step_cpu_s"] = times, cpu
    if profile:
        watch.spent["other"] = sum(times) - sum(watch.spent.values())
        out["stages_s"] = {k: v / iters for k, v in watch.spent.items()}
    return out


def _dinokit_runner(cfg: Any, mode: str, student: Any, teacher: Any, ipe: int) -> tuple[Any, str]:
    """dinokit's ``TrainState`` at epoch 1 (the last layer trains, as in the official run) and its ``step``."""
    import torch

    from dinokit.training.precision import choose_precision, probe_views
    from dinokit.training.state import TrainState, step

    dev = torch.device("cpu")
    if mode.endswith("-compile"):  # both backbones through torch.compile (config ``compile: true``)
        cfg = cfg.replace({"compile": True})
    if mode == "dinokit":  # the loop's own "auto" choice (a short probe where the CPU has native bf16)
        precision = choose_precision(cfg.replace({"precision": "auto"}), dev, student, teacher, probe_views(cfg, dev))
    else:
        precision = mode.split("-")[1]
    state = TrainState.create(cfg, dev, student, teacher, iterations_per_epoch=ipe, global_batch=cfg.optim.batch_size_per_gpu)
    state.prepare(precision)
    state.iteration = ipe

    def run(crops: list[Any]) -> None:
        step(state, crops)

    run.state = state  # type: ignore[attr-defined]
    return run, precision


def _instrument_dinokit(run: Any, watch: Stopwatch) -> None:
    """Time the parts of dinokit's step by wrapping them (the step itself is untouched)."""
    import torch

    from dinokit.training import state as state_mod

    st = run.state
    st.teacher.forward = watch.wrap("teacher fwd", st.teacher.forward)
    st.forward.forward = watch.wrap("student fwd", st.forward.forward)
    st.loss_fn.forward = watch.wrap("loss", st.loss_fn.forward)
    st.optimizer.step = watch.wrap("optimizer", st.optimizer.step)
    state_mod.clip_gradients = watch.wrap("clip", state_mod.clip_gradients)
    state_mod.ema_update_ = watch.wrap("EMA", state_mod.ema_update_)
    torch.Tensor.backward = watch.wrap("backward", torch.Tensor.backward)  # type: ignore[method-assign]


def _reimpl_runner(cfg: Any, student: Any, teacher: Any, ncrops: int, watch: Stopwatch) -> Any:
    from dinokit.training.loss import DINOLoss
    from dinokit.training.optim import build_optimizer, set_schedules

    optimizer = build_optimizer(student)
    set_schedules(optimizer, 1e-4, 0.04)
    loss_fn = DINOLoss(cfg.model.out_dim, ncrops, 0.04, 0.04, 0, 100)

    def run(crops: list[Any]) -> None:
        _reimpl_step(crops, student, teacher, optimizer, loss_fn, watch)

    return run


def _reimpl_step(crops: list[Any], student: Any, teacher: Any, optimizer: Any, loss_fn: Any, w: Stopwatch) -> None:
    """The re-implemented official-style step: fp32, explicit loss loop, per-parameter clip and EMA."""
    import torch
    import torch.nn.functional as F

    t = time.perf_counter()
    teacher_output = teacher(crops[:2])
    t1 = time.perf_counter()
    student_output = student(crops)
    t2 = time.perf_counter()
    s = (student_output / loss_fn.student_temp).chunk(loss_fn.ncrops)
    q = F.softmax((teacher_output - loss_fn.center) / 0.04, dim=-1).detach().chunk(2)
    total, n = 0, 0
    for iq, qi in enumerate(q):
        for v in range(len(s)):
            if v != iq:
                total = total + torch.sum(-qi * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                n += 1
    loss = total / n
    loss_fn.update_center(teacher_output)
    if not torch.isfinite(torch.tensor(loss.item())):
        raise FloatingPointError("non-finite loss")
    t3 = time.perf_counter()
    optimizer.zero_grad()
    loss.backward()
    t4 = time.perf_counter()
    for p in student.parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            _ = norm.item()
            coef = 3.0 / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)
    t5 = time.perf_counter()
    optimizer.step()
    t6 = time.perf_counter()
    with torch.no_grad():
        for sp, tp in zip(student.parameters(), teacher.parameters(), strict=True):
            tp.data.mul_(0.996).add_((1 - 0.996) * sp.detach().data)
    t7 = time.perf_counter()
    for stage, a, z in zip(STAGES, (t, t1, t2, t3, t4, t5, t6), (t1, t2, t3, t4, t5, t6, t7), strict=False):
        w.add(stage, z - a)


def worker(config: str, mode: str, iters: int, warmup: int, threads: int, repo: str | None,
           profile: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    if mode == "official":
        if not repo:
            raise SystemExit("mode official needs --official-repo PATH (a facebookresearch/dino snapshot)")
        out = run_official(config, iters, warmup, repo, profile)
    else:
        out = run_dinokit(config, mode, iters, warmup, profile)
    from dinokit.training.config import TrainConfig

    out.update(config=config, mode=mode, threads=threads,
               batch=TrainConfig().replace(CONFIGS[config]).optim.batch_size_per_gpu,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def summarize(modes: list[str], runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per mode: medians over every timed step of every round; % of the peak per step.

    Every mode does the same work, so all rows use one FLOP count: the largest counted (timm's fused
    attention is counted by torch's SDPA formula, a few % below the explicit matmuls of the others).
    """
    rows = []
    flops = max(r["step_flops"] for m in modes for r in runs[m])
    for m in modes:
        rs = runs[m]
        aug = statistics.median(t for r in rs for t in r["aug_s"])
        step = statistics.median(t for r in rs for t in r["step_s"])
        step_cpu = statistics.median(t for r in rs for t in r["step_cpu_s"])
        pct = [100 * flops / t / (r["gemm_gflops"] * 1e9) for r in rs for t in r["step_s"]]
        rows.append({"mode": m, "label": LABELS[m], "precision": rs[0].get("precision", "fp32"),
                     "aug_s_per_batch": aug, "model_s_per_batch": step, "images_per_s": rs[0]["batch"] / (aug + step),
                     "model_images_per_s": rs[0]["batch"] / step, "step_cpu_s": step_cpu, "step_gflop": flops / 1e9,
                     "counted_gflop": rs[0]["step_flops"] / 1e9, "model_gflops": flops / step / 1e9,
                     "gemm_gflops": statistics.median(r["gemm_gflops"] for r in rs),
                     "pct_gemm_peak": statistics.median(pct),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                     "stages_s": _mean_stages(rs)})
    return rows


def _mean_stages(rs: list[dict[str, Any]]) -> dict[str, float] | None:
    if "stages_s" not in rs[0]:
        return None
    keys = [k for k in STAGES if any(k in r["stages_s"] for r in rs)]
    return {k: statistics.mean(r["stages_s"].get(k, 0.0) for r in rs) for k in keys}


def _ratios(modes: list[str], runs: dict[str, list[dict[str, Any]]], base: str) -> dict[str, float]:
    """Per round, each mode's model-step speed over the baseline's from the same round; the median."""
    out = {}
    for m in modes:
        per_round = [statistics.median(rb["step_s"]) / statistics.median(rm["step_s"])
                     for rb, rm in zip(runs[base], runs[m], strict=True)]
        out[m] = statistics.median(per_round)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="fmnist")
    ap.add_argument("--modes", default="official,dinokit,dinokit-fp32",
                    help="comma list of " + ", ".join(LABELS) + "; the first is the baseline of the ratios")
    ap.add_argument("--official-repo", help="folder of a facebookresearch/dino snapshot (needed by mode official)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per run (after the warm-up ones)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed iterations first (the first counts the FLOPs); glibc malloc adapts its mmap "
                         "threshold over the first steps (fp32 Fashion-MNIST: 411k page faults and 2.7 s of system "
                         "time in the first step, 55k and 0.15 s by the sixth), so 1 times the allocator's warm-up")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="split each step by stage")
    ap.add_argument("--log-runs", help="append every worker's JSON result to this file as soon as it ends")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first step counts the FLOPs)")
    if args.worker:
        res = worker(args.worker[0], args.worker[1], args.iters, args.warmup, args.threads, args.official_repo,
                     args.profile)
        print(json.dumps(res))
        return
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in LABELS]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; expected some of {list(LABELS)}")
    if "official" in modes and not args.official_repo:
        raise SystemExit("mode official needs --official-repo PATH (a facebookresearch/dino snapshot)")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            cmd = [sys.executable, __file__, "--worker", args.config, m, "--iters", str(args.iters),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)] + (["--official-repo", args.official_repo]
                                                      if args.official_repo else []) + (["--profile"] if args.profile else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"worker {m} failed:\n{out.stderr[-3000:]}")
            runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
            if args.log_runs:
                with open(args.log_runs, "a") as f:
                    f.write(json.dumps(runs[m][-1]) + "\n")
    rows = summarize(modes, runs)
    ratios = _ratios(modes, runs, modes[0])
    for r in rows:
        r["x_baseline_model"] = ratios[r["mode"]]
        r["x_baseline_total"] = r["images_per_s"] / rows[0]["images_per_s"]
    info = _machine.machine_info(args.threads)
    print(json.dumps({"config": args.config, "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds, "machine": info,
                      "official_commit": runs.get("official", [{}])[0].get("official_commit"), "rows": rows},
                     indent=2))
    _print_tables(args, rows, info, modes[0])


def _print_tables(args: argparse.Namespace, rows: list[dict[str, Any]], info: dict[str, Any], base: str) -> None:
    print(f"\n{info['utc']} UTC, {info['cpu']} ({info['flags']}), {args.threads} threads, "
          f"load avg {info['load_avg_1min']:.1f}; baseline of the ratios: {LABELS[base]}")
    print(f"\n| config | mode | precision | aug s/batch | step s/batch | img/s (aug+step) | step img/s | "
          f"x {base} (step, per round) | x {base} (aug+step) | step GFLOP | GFLOP/s | fp32 GEMM peak GFLOP/s | "
          "% of peak | step CPU-s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {args.config} | {r['label']} | {r['precision']} | {r['aug_s_per_batch']:.3f} | "
              f"{r['model_s_per_batch']:.3f} | {r['images_per_s']:.1f} | {r['model_images_per_s']:.1f} | "
              f"{r['x_baseline_model']:.2f} | {r['x_baseline_total']:.2f} | {r['step_gflop']:.0f} | "
              f"{r['model_gflops']:.0f} | {r['gemm_gflops']:.0f} | {r['pct_gemm_peak']:.0f}% | {r['step_cpu_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} |")
    if rows[0]["stages_s"] is None:
        return
    print("\nStep by stage (s per step, mean over the timed steps of every round):\n")
    print("| mode | " + " | ".join(STAGES) + " | step |")
    print("|---|" + "---|" * (len(STAGES) + 1))
    for r in rows:
        st = r["stages_s"]
        print(f"| {r['label']} | " + " | ".join(f"{st[k]:.3f}" if k in st else "-" for k in STAGES)
              + f" | {sum(st.values()):.3f} |")


if __name__ == "__main__":
    main()
