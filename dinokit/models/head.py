"""The DINO projection head and the multi-crop wrapper (backbone + head over crops of several sizes).

The head is an MLP (Linear-GELU x (nlayers-1), optional BatchNorm) to a bottleneck, L2 normalisation,
then a weight-normalised linear layer without bias to ``out_dim`` prototypes. Its state dict uses the
official key names (``last_layer.weight_g`` / ``last_layer.weight_v``) so official full checkpoints
load with strict=True; the parametrised names are accepted too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

_G, _V = "last_layer.weight_g", "last_layer.weight_v"
_PG, _PV = "last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"


class DINOHead(nn.Module):
    """(B, in_dim) features -> (B, out_dim) prototype logits, as the official DINOHead."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        # The last layer keeps nn.Linear's default init (the official code applies trunc_normal first).
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        # norm_last_layer: g stays 1, so every prototype is a unit vector.
        g.requires_grad_(not norm_last_layer)
        self.register_state_dict_post_hook(_to_official_keys)
        self.register_load_state_dict_pre_hook(_from_official_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _to_official_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for new, old in ((_G, _PG), (_V, _PV)):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def _from_official_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for new, old in ((_G, _PG), (_V, _PV)):
        if prefix + new in state_dict:
            state_dict[prefix + old] = state_dict.pop(prefix + new)


def convert_official_head_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Official head keys (``weight_g``/``weight_v``, old ``nn.utils.weight_norm``) -> parametrised names.

    Only needed to load into a plain module tree; :class:`DINOHead` itself accepts both namings.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            rest = k[len(prefix):]
            rest = {_G: _PG, _V: _PV}.get(rest, rest)
            k = prefix + rest
        out[k] = v
    return out


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops: crops of one resolution go through the backbone together.

    forward(crops: list of (B, 3, H_i, W_i)) -> (len(crops) * B, out_dim), crops in input order.
    State dict keys: ``backbone.*`` and ``head.*`` (the official layout).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats = [self.backbone(torch.cat(list(group)) if len(group) > 1 else group[0])
                 for group in _same_resolution_groups(crops)]
        return self.head(torch.cat(feats) if len(feats) > 1 else feats[0])


def _same_resolution_groups(crops: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive crops with the same (H, W), like the official unique_consecutive over widths."""
    groups: list[list[torch.Tensor]] = []
    for c in crops:
        if groups and groups[-1][0].shape[-2:] == c.shape[-2:]:
            groups[-1].append(c)
        else:
            groups.append([c])
    return groups
