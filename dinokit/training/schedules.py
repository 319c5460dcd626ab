"""Per-iteration schedules (pure numpy), as the official ``cosine_scheduler``."""

from __future__ import annotations

import numpy as np


def cosine_schedule(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0) -> np.ndarray:
    """One value per iteration, length ``epochs * niter_per_ep``.

    Linear warm-up ``linspace(start_warmup_value, base_value, warmup_epochs * niter_per_ep)``, then
    ``final + 0.5 * (base - final) * (1 + cos(pi * i / n))`` for i in 0..n-1 over the remaining n iterations.
    """
    warmup_iters = int(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(int(epochs * niter_per_ep) - warmup_iters)
    n = max(len(iters), 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / n))
    schedule = np.concatenate((warmup, cosine))
    if len(schedule) != epochs * niter_per_ep:
        raise ValueError(f"schedule length {len(schedule)} != epochs * niter_per_ep = {epochs * niter_per_ep}")
    return schedule


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          nepochs: int) -> np.ndarray:
    """One teacher temperature per epoch: linear warm-up over the first epochs, then constant."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))
