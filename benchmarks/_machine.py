"""What the machine can do right now: fp32 GEMM peak, CPU vector extensions, threads.

The CPU machines are shared and change between sessions, so every benchmark row states the CPU's
vector extensions and relates its time to a GEMM peak measured in the same process, next to the
figure (a peak from another minute can be 40% off on a shared host).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch


def gemm_gflops(n: int = 4096, repeat: int = 2, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of ``torch.matmul`` of two (n, n) matrices with the current torch threads.

    FLOPs are 2 n^3 (one multiply and one add per multiply-add). One untimed call warms up.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    """One dict for a benchmark's JSON: CPU, flags, torch, threads, load average, UTC time."""
    from dinokit.devices import cpu_has_native_bf16, cpu_vector_extensions

    return {
        "cpu": cpu_model(), "flags": cpu_vector_extensions(), "native_bf16": cpu_has_native_bf16(),
        "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
        "load_avg_1min": os.getloadavg()[0], "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` once under ``FlopCounterMode``; returns (its result, FLOPs counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, int(counter.get_total_flops())


@contextmanager
def peak_around(results: dict[str, Any], n: int = 4096):
    """Measure the fp32 GEMM peak before and after the block; stores both and their mean in ``results``."""
    before = gemm_gflops(n)
    yield
    after = gemm_gflops(n)
    results["gemm_gflops_before"], results["gemm_gflops_after"] = before, after
    results["gemm_gflops"] = (before + after) / 2
