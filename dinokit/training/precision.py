"""Numeric precision of a run: fp32/bf16/fp16 as configured, or "auto", chosen cheaply and announced.

"auto": bf16 on CUDA (fp16 where bf16 is missing); on a CPU without native bf16 (AVX2-only: oneDNN
emulates bf16 up to ~50x slower) fp32 at once, with no measurement; on a CPU with AVX512-BF16 or AMX,
one small timed step per precision on ``PROBE_IMAGES`` images per view (the training shapes), the
bf16 one cut off as soon as it is no longer faster. The choice is logged on
``dinokit.training.precision`` (the CLI shows it).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from dinokit.devices import cpu_has_native_bf16
from dinokit.training.config import TrainConfig

log = logging.getLogger(__name__)

PROBE_IMAGES = 8  # images per view in the probe step: enough to time the kernels, cheap to run
BF16_MARGIN = 0.95  # bf16 must be at least 5% faster per step to be chosen


class _TooSlow(Exception):
    """Raised inside the timed step once it can no longer beat the other precision."""


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """The autocast context of a precision ("fp32": none)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def use_fused_attention(cfg: TrainConfig, device: torch.device, precision: str) -> bool | None:
    """The fused-attention setting for timm attention layers (None: leave timm's default)."""
    if cfg.model.fused_attn is not None:
        return cfg.model.fused_attn
    if device.type == "cpu" and precision == "bf16":
        return False
    return None


def set_fused_attention(model: nn.Module, enabled: bool | None) -> int:
    """Set ``fused_attn`` on every timm attention layer of ``model``; returns how many were set."""
    if enabled is None:
        return 0
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = bool(enabled)  # type: ignore[assignment]  # a plain bool of timm's Attention
            n += 1
    return n


def probe_views(cfg: TrainConfig, device: torch.device, channels_last: bool = False,
                n: int = PROBE_IMAGES) -> list[torch.Tensor]:
    """Random views with the training shapes: 2 x (n, 3, G, G) and local_crops_number x (n, 3, L, L).

    Made before the data loader starts, so its worker processes do not compete with the timing.
    """
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    d = cfg.data
    sizes = [d.global_crops_size] * 2 + [d.local_crops_size] * d.local_crops_number
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.randn(n, 3, s, s, generator=gen).to(device).contiguous(memory_format=fmt) for s in sizes]


def choose_precision(cfg: TrainConfig, device: torch.device, student: nn.Module, teacher: nn.Module,
                     crops: list[torch.Tensor] | None) -> str:
    """fp32/bf16/fp16 as configured, or the "auto" choice (see the module doc); the networks are not touched.

    crops: views [(B, 3, S, S), ...] as a step gets them (:func:`probe_views`); at most ``PROBE_IMAGES``
    images of each are used.
    """
    if cfg.precision != "auto":
        if cfg.precision == "fp16" and device.type != "cuda":
            raise ValueError("precision: fp16 needs CUDA; use bf16 or fp32 on CPU")
        return cfg.precision
    if device.type == "cuda":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        log.info("precision auto: %s on CUDA", choice)
        return choice
    if device.type != "cpu" or crops is None:
        return "fp32"
    if not cpu_has_native_bf16():
        log.info("precision auto: fp32 (this CPU has no native bf16; nothing to measure)")
        return "fp32"
    return _probe_cpu(cfg, device, student, teacher, [c[:PROBE_IMAGES] for c in crops])


def _probe_cpu(cfg: TrainConfig, device: torch.device, student: nn.Module, teacher: nn.Module,
               crops: list[torch.Tensor]) -> str:
    """One fp32 step, then one bf16 step stopped as soon as it is no longer clearly faster."""
    log.info("precision auto: timing one fp32 and one bf16 step on %d images (native bf16 CPU)", len(crops[0]))
    t0 = time.perf_counter()
    t32 = step_time(student, teacher, crops, device, "fp32", use_fused_attention(cfg, device, "fp32"))
    t16 = step_time(student, teacher, crops, device, "bf16", use_fused_attention(cfg, device, "bf16"),
                    deadline_s=BF16_MARGIN * t32)
    choice = "bf16" if t16 < BF16_MARGIN * t32 else "fp32"
    bf16 = f"{t16:.3f} s" if t16 != float("inf") else f"stopped after {BF16_MARGIN * t32:.3f} s"
    log.info("precision auto: fp32 %.3f s, bf16 %s per probe step -> %s (probe %.1f s, counted in max_minutes)",
             t32, bf16, choice, time.perf_counter() - t0)
    return choice


def step_time(student: nn.Module, teacher: nn.Module, crops: list[torch.Tensor], device: torch.device,
              precision: str, fused: bool | None = None, deadline_s: float | None = None) -> float:
    """Seconds of one forward+backward of copies of the networks (the real ones are not touched).

    With ``deadline_s`` the step is abandoned (result: inf) once it has run that long.
    """
    s, t = copy.deepcopy(student), copy.deepcopy(teacher)  # no grads, BatchNorm statistics or flags leak
    set_fused_attention(s, fused)
    set_fused_attention(t, fused)
    t0 = time.perf_counter()
    try:
        with _deadline([s, t], t0, deadline_s):
            with autocast(device, precision):
                with torch.no_grad():
                    t(crops[:2])
                out = s(crops)
            out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except _TooSlow:
        return float("inf")
    return time.perf_counter() - t0


@contextmanager
def _deadline(models: list[nn.Module], t0: float, limit_s: float | None) -> Iterator[None]:
    """Raise _TooSlow from the next module forward or parameter gradient after ``limit_s`` seconds."""
    if limit_s is None:
        yield
        return

    def check(*_: Any) -> None:
        if time.perf_counter() - t0 > limit_s:
            raise _TooSlow

    handles = [m.register_forward_pre_hook(check) for net in models for m in net.modules()]
    handles += [p.register_hook(check) for net in models for p in net.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
