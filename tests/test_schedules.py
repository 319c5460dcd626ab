"""cosine_schedule values at chosen iterations, EMA step, parameter groups, per-tensor clip, last-layer freeze."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dinokit.models.head import DINOHead, MultiCropWrapper
from dinokit.training.ema import ema_update_
from dinokit.training.optim import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients,
    param_groups,
    set_schedules,
)
from dinokit.training.schedules import cosine_schedule


def test_cosine_schedule_values() -> None:
    s = cosine_schedule(0.1, 0.001, epochs=3, niter_per_ep=4, warmup_epochs=1, start_warmup_value=0.0)
    assert len(s) == 12
    # warm-up: linspace(0, 0.1, 4)
    assert s[:4].tolist() == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    # cosine part over n = 8 iterations: final + 0.5 (base - final)(1 + cos(pi i / 8))
    for i in (0, 1, 4, 7):
        assert s[4 + i] == pytest.approx(0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * i / 8)))
    assert s[8] == pytest.approx(0.0505)
    m = cosine_schedule(0.996, 1.0, epochs=100, niter_per_ep=10)
    assert m[0] == pytest.approx(0.996) and m[500] == pytest.approx(0.998) and m[-1] < 1.0


def test_ema_step() -> None:
    t = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    s = [torch.tensor([3.0, -2.0]), torch.tensor([[4.0]])]
    ema_update_(t, s, 0.75)
    assert t[0].tolist() == [1.5, 1.0] and t[1].item() == 1.0
    assert s[0].tolist() == [3.0, -2.0]  # student untouched
    with pytest.raises(ValueError, match="teacher has 1 parameters, student 2"):
        ema_update_(t[:1], s, 0.5)


def test_param_groups_official_split(tiny_vit: nn.Module) -> None:
    model = MultiCropWrapper(tiny_vit, DINOHead(48, 32, hidden_dim=16, bottleneck_dim=8))
    groups = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    reg = {names[id(p)] for p in groups[0]["params"]}
    noreg = {names[id(p)] for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    assert "backbone.blocks.0.attn.qkv.weight" in reg and "backbone.cls_token" in reg and "backbone.pos_embed" in reg
    assert "head.last_layer.parametrizations.weight.original1" in reg
    assert "backbone.blocks.0.norm1.weight" in noreg and "backbone.blocks.0.attn.qkv.bias" in noreg
    assert "head.mlp.0.bias" in noreg
    assert "head.last_layer.parametrizations.weight.original0" not in reg | noreg  # g frozen
    assert all(n.endswith(".bias") or dict(model.named_parameters())[n].ndim == 1 for n in noreg)
    opt = build_optimizer(model)
    set_schedules(opt, 0.01, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_per_tensor_clipping() -> None:
    m = nn.Linear(2, 1)
    m.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5 -> scaled by 1 / (5 + 1e-6)
    m.bias.grad = torch.tensor([0.5])  # norm 0.5 -> untouched
    norms = clip_gradients(m, 1.0)
    assert [n.item() for n in norms] == pytest.approx([5.0, 0.5])
    assert m.weight.grad.tolist()[0] == pytest.approx([3 / (5 + 1e-6), 4 / (5 + 1e-6)], rel=1e-7)
    assert m.bias.grad.item() == 0.5


def test_last_layer_frozen_during_first_epochs() -> None:
    torch.manual_seed(0)
    head = DINOHead(6, 5, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4)
    opt = build_optimizer(head)
    set_schedules(opt, 0.1, 0.5)
    v0 = head.last_layer.parametrizations.weight.original1.detach().clone()
    g0 = head.last_layer.parametrizations.weight.original0.detach().clone()
    w0 = head.mlp[0].weight.detach().clone()
    for epoch, frozen in ((0, True), (1, False)):
        opt.zero_grad()
        head(torch.randn(4, 6)).sum().backward()
        cancel_last_layer_gradients(head, epoch, freeze_last_layer=1)
        lp = head.last_layer.parametrizations.weight
        assert (lp.original1.grad is None) == frozen and (lp.original0.grad is None) == frozen
        opt.step()
        if frozen:  # no update at all, not even weight decay
            assert torch.equal(lp.original1, v0) and torch.equal(lp.original0, g0)
            assert not torch.equal(head.mlp[0].weight, w0)
    assert not torch.equal(head.last_layer.parametrizations.weight.original1, v0)
