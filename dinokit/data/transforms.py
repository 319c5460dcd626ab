"""Eval preprocessing: DINO's official k-NN / linear-eval transform, sized from the model's config.

Official: ``Resize(256, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize(ImageNet)``. Here the
sizes come from ``model.pretrained_cfg`` (input_size, crop_pct = 224/256, interpolation, mean, std),
so a model with another input size gets the same recipe scaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from dinokit.data.images import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DEFAULTS: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "crop_mode": "center",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
}

_INTERP = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
    "lanczos": T.InterpolationMode.LANCZOS,
    "box": T.InterpolationMode.BOX,
    "hamming": T.InterpolationMode.HAMMING,
}


def preprocessing_config(cfg_or_model: nn.Module | Mapping[str, Any] | None = None,
                         image_size: int | None = None) -> dict[str, Any]:
    """The resolved eval settings: crop size, resize size, interpolation, mean and std.

    ``cfg_or_model`` is a model (its ``pretrained_cfg`` is used), a pretrained_cfg-like mapping, or
    None (DINO defaults). ``image_size`` overrides the crop size; the resize keeps the crop ratio.
    """
    if isinstance(cfg_or_model, nn.Module):
        cfg = dict(getattr(cfg_or_model, "pretrained_cfg", None) or {})
    else:
        cfg = dict(cfg_or_model or {})
    cfg = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    crop = int(image_size) if image_size is not None else int(cfg["input_size"][-1])
    crop_pct = float(cfg["crop_pct"])
    interp = str(cfg["interpolation"])
    if interp not in _INTERP:
        raise ValueError(f"interpolation {interp!r}: expected one of {sorted(_INTERP)}")
    crop_mode = str(cfg["crop_mode"])
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"crop_mode {crop_mode!r}: expected 'center' (resize the short side, center crop) or "
                         "'squash' (resize both sides, as DINOv3)")
    return {
        "crop_size": crop,
        # timm and DINO both floor: 224 / 0.875 = 256 exactly.
        "resize_size": math.floor(crop / crop_pct),
        "interpolation": interp,
        "crop_mode": crop_mode,
        "mean": tuple(float(m) for m in cfg["mean"]),
        "std": tuple(float(s) for s in cfg["std"]),
    }


def ensure_rgb(img: Image.Image) -> Image.Image:
    """``img`` itself when already RGB, else :func:`to_rgb` of it (a transform step of every pipeline)."""
    # Module-level (not a lambda) so the transform pickles into DataLoader worker processes.
    return img if img.mode == "RGB" else to_rgb(img)


def resize_arg(p: Mapping[str, Any]) -> list[int]:
    """The ``size`` argument of torchvision's resize for preprocessing ``p``: ``[short side]`` for
    "center" (aspect kept), ``[R, R]`` for "squash" (DINOv3's official eval resizes both sides)."""
    r = int(p["resize_size"])
    return [r, r] if p.get("crop_mode") == "squash" else [r]


def resize_and_crop(p: Mapping[str, Any]) -> T.Compose:
    """PIL image -> PIL image (S, S): the geometric part of :func:`eval_transform`."""
    return T.Compose([
        T.Resize(resize_arg(p), interpolation=_INTERP[p["interpolation"]], antialias=True),
        T.CenterCrop(p["crop_size"]),
    ])


def eval_transform(cfg_or_model: nn.Module | Mapping[str, Any] | None = None,
                   image_size: int | None = None) -> T.Compose:
    """PIL image (any mode) -> normalized float tensor (3, S, S), S = crop size.

    Resize the short side to ``floor(S / crop_pct)`` (both sides for ``crop_mode="squash"``; bicubic,
    antialiased), center-crop S, scale to [0, 1], normalize with the model's mean/std. Grayscale
    becomes 3 equal channels.
    """
    p = preprocessing_config(cfg_or_model, image_size)
    return T.Compose([
        T.Lambda(ensure_rgb),
        resize_and_crop(p),
        T.ToTensor(),
        T.Normalize(p["mean"], p["std"]),
    ])


def pixel_transform(p: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image (any mode) -> the resized, center-cropped RGB pixels, uint8 (3, S, S).

    ``p``: a :func:`preprocessing_config`. :func:`eval_transform` without its float steps: batches of
    these go through :func:`normalize_pixels` once, ~4x cheaper than ToTensor + Normalize per image.
    """
    geometry = resize_and_crop(p)

    def pixels(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(geometry(ensure_rgb(img)), dtype=np.uint8)).permute(2, 0, 1)

    return pixels


def normalize_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels (B, 3, S, S) -> float32 model input (B, 3, S, S), = ToTensor + Normalize per image.

    One multiply and one subtract per channel straight from uint8 (x / (255 std) - mean / std), no
    float copy of the whole batch in between; equal to the per-image steps within float32 rounding.
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"pixels must be uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for c in range(3):
        torch.mul(x[:, c], 1.0 / (255.0 * std[c]), out=out[:, c])
        out[:, c].sub_(mean[c] / std[c])
    return out
