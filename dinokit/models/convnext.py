"""DINOv3 ConvNeXt: the official layout -> timm's ConvNeXt.

The official model (``dinov3/models/convnext.py``) is Facebook's ConvNeXt: ``downsample_layers``
(stem conv 4/4 + channels-first LayerNorm; then LayerNorm + conv 2/2), ``stages.i.j`` blocks
(depthwise 7x7, LayerNorm, pointwise MLP, ``gamma`` layer scale) and a final LayerNorm applied to
the global average pool, which is also what timm's ConvNeXt head computes with ``num_classes=0``.
timm's own checkpoint filter renames the keys; ``norms.3`` is the same final norm registered twice
and is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from dinokit.models.convert import CheckpointError

# (depths, dims) -> timm arch; the DINOv3 sizes are the standard ConvNeXt ones.
_ARCHS: dict[tuple[tuple[int, ...], tuple[int, ...]], str] = {
    ((3, 3, 9, 3), (96, 192, 384, 768)): "convnext_tiny",
    ((3, 3, 27, 3), (96, 192, 384, 768)): "convnext_small",
    ((3, 3, 27, 3), (128, 256, 512, 1024)): "convnext_base",
    ((3, 3, 27, 3), (192, 384, 768, 1536)): "convnext_large",
}


def is_hf_convnext(sd: Mapping[str, torch.Tensor]) -> bool:
    """HF transformers ``DINOv3ConvNextModel`` keys (``stages.i.layers.j.depthwise_conv``)."""
    return "stages.0.downsample_layers.0.weight" in sd and "stages.0.layers.0.depthwise_conv.weight" in sd


def hf_convnext_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF DINOv3ConvNext keys -> official keys (the HF conversion's renames, inverted)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.\2.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample_layers\.(\d+)\.", r"downsample_layers.\1.\2.", k)
        k = k.replace("depthwise_conv", "dwconv").replace("pointwise_conv", "pwconv").replace("layer_norm", "norm")
        out[k] = v
    return out


def is_official_convnext(sd: Mapping[str, torch.Tensor]) -> bool:
    """Facebook/DINOv3 ConvNeXt keys (``downsample_layers.*``, ``stages.i.j.dwconv``)."""
    return "downsample_layers.0.0.weight" in sd and "stages.0.0.dwconv.weight" in sd


def _depths_dims(sd: Mapping[str, torch.Tensor], block: str, dw: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    depths, dims = [], []
    for stage in range(4):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"^stages\.{stage}\.{block}(\d+)\.", k))}
        if not idx:
            break
        depths.append(len(idx))
        dims.append(int(sd[f"stages.{stage}.{block}0.{dw}.weight"].shape[0]))
    return tuple(depths), tuple(dims)


def convnext_config(depths: tuple[int, ...], dims: tuple[int, ...]) -> dict[str, Any]:
    """timm ConvNeXt config for these stage depths and widths (named arch when standard)."""
    arch = _ARCHS.get((depths, dims))
    if arch is not None:
        return {"architecture": arch, "model_args": {}}
    return {"architecture": "convnext_tiny", "model_args": {"depths": list(depths), "dims": list(dims)}}


def official_convnext_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv3 ConvNeXt state dict -> timm ConvNeXt keys, through timm's checkpoint filter."""
    import timm
    from timm.models.convnext import checkpoint_filter_fn

    cfg = convnext_config(*_depths_dims(sd, "", "dwconv"))
    with torch.device("meta"):  # the filter reads target shapes only
        model = timm.create_model(cfg["architecture"], num_classes=0, **cfg["model_args"])
    return checkpoint_filter_fn(dict(sd), model)


def infer_convnext(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Config of a timm-keyed ConvNeXt state dict (stage depths and widths from the tensors)."""
    depths, dims = _depths_dims(sd, "blocks.", "conv_dw")
    if len(depths) != 4:
        raise CheckpointError(f"{source}: ConvNeXt with {len(depths)} stages (expected 4)")
    return convnext_config(depths, dims)
