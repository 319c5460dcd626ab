"""Optimizer pieces with the official numerics: parameter groups, per-tensor clipping, last-layer freeze."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups: [regularized, not regularized (weight_decay 0)] in named_parameters order.

    Not regularized: biases and 1-D parameters (norm weights), exactly as the official get_params_groups.
    Frozen parameters (requires_grad False) are left out.
    """
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias") or p.ndim == 1:
            not_regularized.append(p)
        else:
            regularized.append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (official default) or SGD momentum 0.9; lr and wd are set per iteration by the schedules."""
    groups = param_groups(model)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0)  # wd set per iteration on group 0
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    raise ValueError(f"optimizer {name!r}: expected adamw or sgd")


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """lr on every group; weight decay only on the first (regularized) group, as the official loop."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = wd


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> list[torch.Tensor]:
    """Per-tensor clipping: each grad with L2 norm n is scaled by clip / (n + 1e-6) when that is < 1.

    Returns the grad norms (0-d tensors, before clipping). One batched kernel, no host syncs.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads, 2)
    coefs = torch.clamp(clip / (torch.stack(norms) + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return list(norms)


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """During the first ``freeze_last_layer`` epochs drop the head's last-layer grads (no update at all)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
