"""Momentum (EMA) teacher update: theta_t <- m * theta_t + (1 - m) * theta_s, a pure function."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def ema_update_(teacher_params: Sequence[torch.Tensor], student_params: Sequence[torch.Tensor],
                momentum: float) -> None:
    """In place on ``teacher_params`` (multi-tensor ``torch._foreach_*`` kernels); same order as the student's."""
    if len(teacher_params) != len(student_params):
        raise ValueError(f"teacher has {len(teacher_params)} parameters, student {len(student_params)}")
    teacher = list(teacher_params)
    student = [p.detach() for p in student_params]
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
