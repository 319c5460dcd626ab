"""The DINO loss: cross-entropy between the centered, sharpened teacher and the student, over view pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinokit import distributed
from dinokit.training.schedules import teacher_temp_schedule


class DINOLoss(nn.Module):
    """H(P_t, P_s) averaged over (teacher global view, student view) pairs of different views and the batch.

    P_t = softmax((teacher - center) / tau_t(epoch)), P_s = softmax(student / student_temp). The center
    (buffer (1, out_dim)) is an EMA of the batch mean of teacher outputs, summed over all ranks.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """student_output (ncrops * B, K), teacher_output (2 * B, K), crops stacked view by view -> scalar.

        Also updates ``center`` from ``teacher_output`` (after the loss is computed with the old center).
        """
        student_output = student_output.float()
        teacher_output = teacher_output.float()
        n_teacher = teacher_output.shape[0] // (student_output.shape[0] // self.ncrops)
        log_p = F.log_softmax(student_output / self.student_temp, dim=-1).chunk(self.ncrops)
        temp = self.teacher_temp(epoch)
        q = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(n_teacher)
        # sum over all student views once, then remove the same-view term: sum_{v != i} = total - v_i
        log_p_all = torch.stack(log_p).sum(0)
        total = teacher_output.new_zeros(())
        n_pairs = 0
        for iq, qi in enumerate(q):
            others = log_p_all - log_p[iq] if iq < self.ncrops else log_p_all
            total = total + torch.sum(-qi * others, dim=-1).mean()
            n_pairs += self.ncrops - (1 if iq < self.ncrops else 0)
        self.update_center(teacher_output)
        return total / n_pairs

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of teacher outputs over every rank's batch."""
        batch_center = torch.sum(teacher_output.detach().float(), dim=0, keepdim=True)
        distributed.all_reduce_sum_(batch_center)
        batch_center = batch_center / (len(teacher_output) * distributed.get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
