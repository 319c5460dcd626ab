"""Backbones are plain timm models, created by name with dynamic image size.

A dinokit model *is* a timm model: ``model(x)`` maps images (B, 3, H, W) to CLS features (B, D),
``model.pretrained_cfg`` holds its preprocessing (input_size, mean, std, crop_pct, interpolation)
and :func:`backbone_config` gives the timm ``config.json`` dict that rebuilds it anywhere.
"""

from __future__ import annotations

import hashlib
from typing import Any

import timm
import torch
from torch import nn

from dinokit._modattr import int_attr, pretrained_cfg

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DINO's eval preprocessing: resize 256 (bicubic), center crop 224 -> crop_pct = 224 / 256.
DINO_PRETRAINED_CFG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "num_classes": 0,
}


def create_backbone(arch: str, pretrained_cfg: dict[str, Any] | None = None, *,
                    pos_embed_resize: str | None = None, **model_args: Any) -> nn.Module:
    """Create a headless timm backbone (``num_classes=0``) whose forward returns (B, D) features.

    ViTs get ``dynamic_img_size=True`` so any input size works (position embeddings are
    interpolated on the fly). ``pretrained_cfg`` entries override DINO's eval preprocessing.
    ``pos_embed_resize="offset"`` gives the official DINO v1 / DINOv2 position resize
    (:mod:`dinokit.models.dinov2`); None or "timm" keeps timm's.
    """
    model_args = {"num_classes": 0, **model_args}
    if _is_vit(arch):
        model_args.setdefault("dynamic_img_size", True)
    cfg = {**DINO_PRETRAINED_CFG, **(pretrained_cfg or {})}
    if "img_size" in model_args:
        size = model_args["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        cfg.setdefault("input_size", (3, h, w))
        if pretrained_cfg is None or "input_size" not in pretrained_cfg:
            cfg["input_size"] = (3, h, w)
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=cfg, **model_args)
    if pos_embed_resize is not None:
        from dinokit.models.dinov2 import apply_pos_embed_resize

        model = apply_pos_embed_resize(model, pos_embed_resize)
    return model.eval()


def _is_vit(arch: str) -> bool:
    return arch.startswith(("vit_", "deit_", "eva", "vit-"))


def backbone_config(model: nn.Module) -> dict[str, Any]:
    """The timm Hub ``config.json`` dict for ``model``: architecture, model_args, pretrained_cfg."""
    from timm.models._hub import get_model_args

    model_args = get_model_args(model, {})
    model_args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_args.items()}
    cfg = dict(pretrained_cfg(model))
    keep = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
    model_cfg: dict[str, Any] = {k: cfg[k] for k in keep if k in cfg}
    model_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_cfg.items()}
    model_cfg["num_classes"] = 0
    from dinokit.models.dinov2 import pos_embed_resize_of

    extra = {"dinokit": {"pos_embed_resize": mode}} if (mode := pos_embed_resize_of(model)) else {}
    return {
        **extra,
        "architecture": cfg.get("architecture") or type(model).__name__,
        "num_classes": 0,
        "num_features": int_attr(model, "num_features"),
        "global_pool": model_args.get("global_pool", ""),
        "model_args": model_args,
        "pretrained_cfg": model_cfg,
    }


def from_backbone_config(config: dict[str, Any]) -> nn.Module:
    """Inverse of :func:`backbone_config` (random weights): rebuild the architecture it describes."""
    args = dict(config.get("model_args", {}))
    args.pop("num_classes", None)
    pcfg = dict(config.get("pretrained_cfg", {}))
    pcfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in pcfg.items()}
    mode = config.get("pos_embed_resize") or (config.get("dinokit") or {}).get("pos_embed_resize")
    return create_backbone(config["architecture"], pretrained_cfg=pcfg, pos_embed_resize=mode, **args)


def fingerprint(model: nn.Module) -> str:
    """A short sha256 of the weights (names, shapes, values): identifies a model for caches and indexes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def identity(model: nn.Module) -> dict[str, Any]:
    """What a model is, for caches, indexes and model cards: name, arch, fingerprint, preprocessing."""
    cfg = pretrained_cfg(model)
    return {
        "name": getattr(model, "dinokit_name", None) or cfg.get("architecture"),
        "arch": cfg.get("architecture"),
        "fingerprint": fingerprint(model),
        "num_features": int(getattr(model, "num_features", 0)),
        "input_size": list(cfg.get("input_size", (3, 224, 224))),
        "mean": list(cfg.get("mean", IMAGENET_MEAN)),
        "std": list(cfg.get("std", IMAGENET_STD)),
        "crop_pct": cfg.get("crop_pct", 0.875),
        "interpolation": cfg.get("interpolation", "bicubic"),
    }
