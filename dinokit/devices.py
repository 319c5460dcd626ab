"""Devices and what the hardware can do: the one place that turns "auto"/"cuda:1" into a torch.device.

Every module that takes a ``device=`` argument resolves it here, so an unavailable device is the same
one-line error everywhere, and the CPU's bf16 ability is probed once for the whole process.
"""

from __future__ import annotations

import functools
import os

import torch


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(device: str | torch.device | None = None, local_rank: int | None = None) -> torch.device:
    """``None``/"auto" -> CUDA if available, else CPU; "cuda" -> ``cuda:<local_rank>`` under torchrun.

    Raises DeviceError (one line) for a device this machine does not have, e.g. "cuda" without a GPU.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, mps)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank or 0)
        if dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return dev


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container or taskset may allow fewer than exist)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX) and oneDNN may use them.

    Elsewhere (AVX2-only CPUs) oneDNN emulates bf16 and runs it up to ~50x slower than fp32, so
    automatic precision choices must never pick (or even try) bf16 there. oneDNN is asked too: with
    its ISA capped (``ONEDNN_MAX_CPU_ISA=AVX2``, as some VMs and benchmarks set) it emulates bf16 on
    a CPU that has the instructions (measured here: 0.6 GFLOP/s against 55 for fp32).
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: play safe with fp32
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and _onednn_has_bf16()


def _onednn_has_bf16() -> bool:
    """oneDNN's own view of bf16 support at its effective ISA (False when capped below AVX-512)."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except RuntimeError:
        return True


def cpu_vector_extensions() -> str:
    """The CPU's vector extensions that decide speed here, for logs and benchmark rows, e.g.
    "avx2 avx512f avx512_bf16" ("baseline" when none, "unknown" off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return "unknown"
    present = " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags) or "baseline"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("ATEN_CPU_CAPABILITY")
    # an ISA cap changes what runs: a row measured under one must say so
    return f"{present} (capped: {cap})" if cap else present
