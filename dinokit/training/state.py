"""What a DINO run holds between iterations (:class:`TrainState`) and one iteration of it (:func:`step`).

Per iteration, in the official order: lr and weight decay from the schedules, teacher forward on the 2
global views, student forward on all views, DINO loss (updates the center), backward, per-tensor
clipping, last-layer freeze, optimizer step, EMA teacher update. The iteration's randomness (drop
path) is seeded from (seed, epoch, iteration, rank), so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dinokit import distributed
from dinokit.models.head import MultiCropWrapper
from dinokit.training.config import OptimConfig, TrainConfig
from dinokit.training.data import mix_seed
from dinokit.training.ema import ema_update_
from dinokit.training.loss import DINOLoss
from dinokit.training.optim import build_optimizer, cancel_last_layer_gradients, clip_gradients, set_schedules
from dinokit.training.precision import autocast, set_fused_attention, use_fused_attention
from dinokit.training.schedules import cosine_schedule

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class Schedules:
    """Per-iteration values (numpy arrays of length epochs * iterations_per_epoch), official formulas."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray

    @classmethod
    def from_config(cls, o: OptimConfig, iterations_per_epoch: int, global_batch: int) -> Schedules:
        """lr scaled by global_batch / 256 with linear warm-up then cosine; wd and teacher momentum cosine."""
        ipe = iterations_per_epoch
        return cls(lr=cosine_schedule(o.lr * global_batch / 256.0, o.min_lr, o.epochs, ipe, o.warmup_epochs),
                   wd=cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, ipe),
                   momentum=cosine_schedule(o.momentum_teacher, 1.0, o.epochs, ipe))


@dataclass
class TrainState:
    """Models, optimizer, loss (with its center), schedules, precision and the iteration counter.

    ``student`` and ``teacher`` are the plain modules (checkpoints, EMA, callbacks); ``forward`` is the
    student as the step runs it (DDP-wrapped and/or compiled after :meth:`prepare`).
    """

    cfg: TrainConfig
    device: torch.device
    student: MultiCropWrapper
    teacher: MultiCropWrapper
    optimizer: torch.optim.Optimizer
    loss_fn: DINOLoss
    schedules: Schedules
    iterations_per_epoch: int
    global_batch: int
    rank: int = 0
    channels_last: bool = False  # convnets: inputs and weights in channels-last layout
    iteration: int = 0
    precision: str = "fp32"
    scaler: Any = None  # torch.amp.GradScaler for fp16, else None
    forward: nn.Module | None = None
    teacher_params: list[torch.Tensor] = field(default_factory=list)
    student_params: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def create(cls, cfg: TrainConfig, device: torch.device, student: MultiCropWrapper, teacher: MultiCropWrapper,
               iterations_per_epoch: int, global_batch: int, rank: int = 0,
               channels_last: bool = False) -> TrainState:
        """The state at iteration 0 for networks already on ``device``."""
        o, lo = cfg.optim, cfg.loss
        loss_fn = DINOLoss(cfg.model.out_dim, 2 + cfg.data.local_crops_number, lo.warmup_teacher_temp,
                           lo.teacher_temp, lo.warmup_teacher_temp_epochs, o.epochs, lo.student_temp,
                           lo.center_momentum).to(device)
        return cls(cfg, device, student, teacher, build_optimizer(student, o.optimizer), loss_fn,
                   Schedules.from_config(o, iterations_per_epoch, global_batch), iterations_per_epoch,
                   global_batch, rank, channels_last, forward=student, teacher_params=list(teacher.parameters()),
                   student_params=list(student.parameters()))

    @property
    def total_iterations(self) -> int:
        return self.cfg.optim.epochs * self.iterations_per_epoch

    def prepare(self, precision: str, scaler_state: dict[str, Any] | None = None) -> None:
        """Fix the precision (fused attention, fp16 scaler), then compile and DDP-wrap as configured."""
        self.precision = precision
        fused = use_fused_attention(self.cfg, self.device, precision)
        if set_fused_attention(self.student, fused) + set_fused_attention(self.teacher, fused):
            log.info("timm fused attention %s", "on" if fused else "off")
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        if self.cfg.compile:
            self.student.backbone.compile()
            self.teacher.backbone.compile()
        self.forward = distributed.wrap_ddp(self.student, self.device)

    def stats(self) -> dict[str, Any]:
        """epoch, iteration (done so far) and the schedule values the last iteration used."""
        it = self.iteration - 1
        epoch = it // self.iterations_per_epoch
        return {"epoch": epoch, "iteration": self.iteration, "lr": float(self.schedules.lr[it]),
                "wd": float(self.schedules.wd[it]), "teacher_temp": self.loss_fn.teacher_temp(epoch),
                "momentum": float(self.schedules.momentum[it])}


def step(state: TrainState, crops: list[torch.Tensor]) -> float:
    """One DINO iteration on this rank's views [(B, 3, S, S) x 2 global, (B, 3, s, s) x local]; the loss value.

    Raises TrainingDiverged on a NaN/inf loss (before any weight changes).
    """
    it = state.iteration
    epoch = it // state.iterations_per_epoch
    set_schedules(state.optimizer, float(state.schedules.lr[it]), float(state.schedules.wd[it]))
    torch.manual_seed(mix_seed(state.cfg.seed, epoch, it, 4) + state.rank)  # drop path etc.: resumable
    with autocast(state.device, state.precision):
        with torch.no_grad():
            teacher_out = state.teacher(crops[:2])
        student_out = (state.forward or state.student)(crops)
    loss = state.loss_fn(student_out, teacher_out, epoch)
    value = float(loss.item())
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value} at iteration {it} (epoch {epoch}); stopping. Try precision=fp32 "
                               "or bf16, a lower optim.lr or a lower loss.teacher_temp")
    _update_student(state, loss, epoch)
    ema_update_(state.teacher_params, state.student_params, float(state.schedules.momentum[it]))
    state.iteration = it + 1
    return value


def _update_student(state: TrainState, loss: torch.Tensor, epoch: int) -> None:
    """Backward, per-tensor clipping, last-layer freeze and the optimizer step (fp16: through the scaler)."""
    o, scaler = state.cfg.optim, state.scaler
    state.optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        if o.clip_grad:
            scaler.unscale_(state.optimizer)
    if o.clip_grad:
        clip_gradients(state.student, o.clip_grad)
    cancel_last_layer_gradients(state.student, epoch, o.freeze_last_layer)
    if scaler is None:
        state.optimizer.step()
    else:
        scaler.step(state.optimizer)
        scaler.update()
