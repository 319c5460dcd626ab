"""Feature kinds of every DINO family from one preprocessed batch.

Token order in every dinokit ViT (timm's, and the official one): CLS, then registers (DINOv2-reg)
or storage tokens (DINOv3), then the patches in raster order. All kinds below are taken after
the final norm, as the official ``x_norm_clstoken`` / ``x_norm_regtokens`` /
``x_norm_patchtokens``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dinokit._modattr import blocks, int_attr, method

FEATURE_KINDS = ("cls", "cls+avgpool", "last4", "patch", "registers")
_LAST_N = re.compile(r"^last(\d+)$")


def check_features(features: str) -> str:
    """Return ``features`` when it names a known kind, else raise ValueError."""
    m = _LAST_N.match(features)
    if features in FEATURE_KINDS or (m is not None and int(m.group(1)) >= 1):
        return features
    raise ValueError(f"features={features!r}: expected one of cls, cls+avgpool, lastN (e.g. last4), patch, "
                     "registers")


def feature_dim(model: nn.Module, features: str = "cls") -> int:
    """Width D of one row of ``compute_features(model, x, features)`` (per token for patch/registers)."""
    d = int_attr(model, "num_features")
    if features == "cls+avgpool":
        return 2 * d
    m = _LAST_N.match(features)
    return d * int(m.group(1)) if m else d


def num_registers(model: nn.Module) -> int:
    """Register / storage tokens between CLS and the patches (0 for DINO v1 and DINOv2 plain)."""
    reg = getattr(model, "reg_token", None)
    return int(reg.shape[1]) if isinstance(reg, torch.Tensor) else 0


def compute_features(model: nn.Module, x: torch.Tensor, features: str = "cls") -> torch.Tensor:
    """Features of a preprocessed batch x (B, 3, H, W).

    - ``cls``: ``model(x)`` (B, D): the normalized CLS token, the official hub forward of every
      family (pooled features for CNNs).
    - ``cls+avgpool``: CLS concatenated with the mean normalized patch token (B, 2D), the official
      ViT-B linear-eval features (registers are not patches and are left out of the mean).
    - ``lastN`` (e.g. ``last4``): CLS of the last N blocks, each through the final norm,
      concatenated (B, N*D), the official ViT-S linear-eval features.
    - ``patch``: the normalized patch tokens of the last block (B, P, D).
    - ``registers``: the normalized register (DINOv2-reg) or storage (DINOv3) tokens (B, R, D).
    """
    check_features(features)
    if features == "cls":
        return model(x)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(f"features={features!r} needs a ViT backbone; {type(model).__name__} only supports 'cls'")
    npre = int_attr(model, "num_prefix_tokens")
    if features in ("cls+avgpool", "patch", "registers"):
        tokens = method(model, "forward_features")(x)  # (B, npre + P, D), final norm applied
        if features == "registers":
            n_reg = num_registers(model)
            if n_reg == 0:
                raise ValueError("features='registers': the model has no register or storage tokens")
            return tokens[:, npre - n_reg:npre]
        patches = tokens[:, npre:]
        if features == "patch":
            return patches
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)
    last = _LAST_N.match(features)
    if last is None:  # check_features let it through, so it is lastN; this narrows the type
        raise ValueError(f"features={features!r}: expected lastN")
    n = int(last.group(1))
    if n > (depth := len(blocks(model))):
        raise ValueError(f"features={features!r}: the model has only {depth} blocks")
    inter = method(model, "forward_intermediates")(x, indices=n, return_prefix_tokens=True, norm=True,
                                                   output_fmt="NLC", intermediates_only=True, stop_early=True)
    return torch.cat([prefix[:, 0] for _, prefix in inter], dim=-1)
