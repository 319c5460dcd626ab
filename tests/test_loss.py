"""DINOLoss against explicit-loop hand computations; center update; teacher temperature warm-up."""

from __future__ import annotations

import math

import pytest
import torch

from dinokit.training.loss import DINOLoss


def _softmax(row: list[float], t: float) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _hand_loss(student: list[list[float]], teacher: list[list[float]], center: list[float], ncrops: int,
               batch: int, s_temp: float, t_temp: float) -> float:
    """The DINO loss written as plain loops over views, samples and prototypes."""
    total, pairs = 0.0, 0
    for iq in range(2):
        for v in range(ncrops):
            if v == iq:
                continue
            pair = 0.0
            for b in range(batch):
                q = _softmax([t - c for t, c in zip(teacher[iq * batch + b], center, strict=True)], t_temp)
                p = _softmax(student[v * batch + b], s_temp)
                pair += -sum(qk * math.log(pk) for qk, pk in zip(q, p, strict=True))
            total += pair / batch
            pairs += 1
    return total / pairs


STUDENT = [[0.1, -0.2, 0.3, 0.0], [0.5, 0.1, -0.4, 0.2],     # global view 1, samples 0 and 1
           [-0.3, 0.2, 0.1, 0.4], [0.0, 0.3, 0.2, -0.1],     # global view 2
           [0.2, 0.2, -0.1, 0.1], [0.3, -0.3, 0.0, 0.05]]    # local view
TEACHER = [[0.2, -0.1, 0.4, 0.1], [0.6, 0.0, -0.3, 0.1],
           [-0.2, 0.3, 0.0, 0.5], [0.1, 0.2, 0.3, -0.2]]


def test_loss_and_center_match_hand_computation() -> None:
    loss_fn = DINOLoss(out_dim=4, ncrops=3, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=3, nepochs=10)
    center0 = [0.05, -0.02, 0.01, 0.0]
    loss_fn.center.copy_(torch.tensor([center0]))
    loss = loss_fn(torch.tensor(STUDENT), torch.tensor(TEACHER), epoch=1)
    # epoch 1 of a 3-epoch warm-up linspace(0.04, 0.07, 3) -> 0.055
    expected = _hand_loss(STUDENT, TEACHER, center0, ncrops=3, batch=2, s_temp=0.1, t_temp=0.055)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # center <- 0.9 * c + 0.1 * mean over the 4 teacher rows
    mean = [sum(r[k] for r in TEACHER) / 4 for k in range(4)]
    want = [0.9 * c + 0.1 * m for c, m in zip(center0, mean, strict=True)]
    assert loss_fn.center.squeeze(0).tolist() == pytest.approx(want, rel=1e-6)
    # a second call uses the updated center
    loss2 = loss_fn(torch.tensor(STUDENT), torch.tensor(TEACHER), epoch=5)
    expected2 = _hand_loss(STUDENT, TEACHER, want, ncrops=3, batch=2, s_temp=0.1, t_temp=0.07)
    assert loss2.item() == pytest.approx(expected2, rel=1e-5)


def test_pairs_skip_same_view_only() -> None:
    """With 2 crops only, each teacher view pairs with the other student view only (2 pairs)."""
    loss_fn = DINOLoss(4, 2, 0.04, 0.04, 0, 1)
    loss = loss_fn(torch.tensor(STUDENT[:4]), torch.tensor(TEACHER), epoch=0)
    assert loss.item() == pytest.approx(
        _hand_loss(STUDENT[:4], TEACHER, [0.0] * 4, ncrops=2, batch=2, s_temp=0.1, t_temp=0.04), rel=1e-5)


def test_teacher_temperature_schedule_and_gradient_only_to_student() -> None:
    loss_fn = DINOLoss(8, 4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                       nepochs=100)
    assert loss_fn.teacher_temp(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(10) == pytest.approx(0.04 + 10 * 0.03 / 29)
    assert loss_fn.teacher_temp(29) == pytest.approx(0.07) and loss_fn.teacher_temp(99) == pytest.approx(0.07)
    s = torch.randn(12, 8, requires_grad=True)
    t = torch.randn(6, 8, requires_grad=True)
    loss_fn(s, t, 0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_bf16_inputs_are_computed_in_fp32() -> None:
    loss_fn = DINOLoss(4, 3, 0.04, 0.04, 0, 1)
    ref = DINOLoss(4, 3, 0.04, 0.04, 0, 1)
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    got = loss_fn(s.bfloat16(), t.bfloat16(), 0)
    want = ref(s.bfloat16().float(), t.bfloat16().float(), 0)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
