"""DINO attention maps: the last block's self-attention, CLS-to-patch maps, threshold masks, overlays, GIFs.

:func:`last_selfattention` returns what the official ``VisionTransformer.get_last_selfattention``
returns: ``softmax(q k^T * scale)`` of the last block, (B, heads, N, N), N = prefix tokens (CLS and
any registers) + patches. It does not turn timm's fused attention off: a forward pre-hook on the
last block's attention module captures that module's input (``norm1(x)``), stops the forward there,
and q, k are recomputed from the module's own ``qkv`` weights. The hook is removed afterwards, so
normal forwards keep using ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dinokit._io import atomic_path
from dinokit._modattr import blocks, int_attr, method, submodule, tensor_attr
from dinokit._types import Progress

log = logging.getLogger(__name__)



class NoAttentionError(ValueError):
    """The model has no ViT self-attention blocks (e.g. a ResNet)."""


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the last attention input is needed."""


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return getattr(model, "dinokit_name", None) or cfg.get("architecture") or type(model).__name__


def _vit(model: nn.Module) -> nn.Module:
    """The ViT inside ``model`` (the model itself, or a ``.backbone`` attribute holding one)."""
    for m in (model, getattr(model, "backbone", None)):
        if isinstance(m, nn.Module) and (found := blocks(m)) and hasattr(found[-1], "attn"):
            return m
    raise NoAttentionError(f"{_model_name(model)}: model has no transformer blocks with self-attention "
                           "(attention maps need a ViT; convolutional models such as ResNets have none)")


def _last_attention_module(model: nn.Module) -> nn.Module:
    attn = submodule(blocks(_vit(model))[-1], "attn")
    if not (hasattr(attn, "qkv") and hasattr(attn, "num_heads")):
        raise NoAttentionError(f"{_model_name(model)}: the last block's attention ({type(attn).__name__}) has no "
                               "fused qkv projection; only timm ViT-style attention is supported")
    return attn


def attention_from_input(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities of a timm ``Attention`` / ``EvaAttention`` module for its input ``x``
    (B, N, C) -> (B, h, N, N).

    Eva (DINOv3) keeps separate q/k/v biases (k fixed at zero) and rotates q and k of the patch
    tokens with ``rope`` (the prefix tokens, CLS and storage, are not rotated), as its forward does.
    """
    B, N, _ = x.shape
    heads = int_attr(attn, "num_heads")
    proj = submodule(attn, "qkv")
    head_dim = int(getattr(attn, "head_dim", int_attr(proj, "out_features") // (3 * heads)))
    if getattr(attn, "q_bias", None) is not None:
        bias = torch.cat([tensor_attr(attn, n) for n in ("q_bias", "k_bias", "v_bias")])
        qkv = torch.nn.functional.linear(x, tensor_attr(proj, "weight"), bias)
    else:
        qkv = proj(x)
    qkv = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    # qk-norm models normalize q and k before the product, exactly as the module's forward does
    q = submodule(attn, "q_norm")(q) if hasattr(attn, "q_norm") else q
    k = submodule(attn, "k_norm")(k) if hasattr(attn, "k_norm") else k
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        npt = int(getattr(attn, "num_prefix_tokens", N - rope.shape[-2]))
        half = bool(getattr(attn, "rotate_half", False))
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
    scale = float(getattr(attn, "scale", head_dim ** -0.5))
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def last_selfattention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's self-attention, (B, 3, H, W) -> (B, heads, N, N), rows summing to 1.

    Same as the official ``get_last_selfattention``: the CLS token is row/column 0, register or
    storage tokens (if any) follow, then the patches in raster order; DINOv3's RoPE is applied to
    q and k of the patches as in its forward. H and W must be multiples of the patch size
    (or the model must pad them); any size works for models created with ``dynamic_img_size=True``.
    """
    vit = _vit(model)
    attn = _last_attention_module(model)
    captured: dict[str, torch.Tensor] = {}

    def capture(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["x"] = args[0] if args else kwargs["x"]
        rope = args[1] if len(args) > 1 else kwargs.get("rope")
        if rope is not None:
            captured["rope"] = rope
        raise _StopForward

    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        method(vit, "forward_features")(x) if hasattr(vit, "forward_features") else vit(x)
    except _StopForward:
        pass
    except AssertionError as e:  # timm's strict image size check
        raise ValueError(f"{_model_name(model)}: cannot take {tuple(x.shape[-2:])} inputs ({e}); create the "
                         "model with dynamic_img_size=True (dinokit models are)") from e
    finally:
        handle.remove()
    if "x" not in captured:
        raise RuntimeError(f"{_model_name(model)}: the forward pass never reached the last attention block")
    return attention_from_input(attn, captured["x"], captured.get("rope"))


# ---------------------------------------------------------------------------- maps and masks


@dataclass
class AttentionMaps:
    """CLS-to-patch attention of one image.

    image: the RGB image the model saw (resized, cropped to a multiple of the patch size), H x W;
    heads: float32 (heads, H, W) per-head maps upsampled to the image (nearest, as official);
    mean: float32 (H, W) the mean over heads; masks: bool (heads, H, W) official threshold masks
    (None when threshold is None); patch_maps: float32 (heads, h, w) at patch resolution;
    threshold: the attention-mass share the masks keep; patch_size: the ViT patch size.
    """

    image: Image.Image
    heads: np.ndarray
    mean: np.ndarray
    masks: np.ndarray | None
    patch_maps: np.ndarray
    threshold: float | None
    patch_size: int

    def __repr__(self) -> str:
        h, w = self.mean.shape
        mask = "no masks" if self.threshold is None else f"masks at {self.threshold:g} of the mass"
        return (f"AttentionMaps({self.heads.shape[0]} heads, {w}x{h} px, patch {self.patch_size}, {mask})")


def threshold_masks(attn: torch.Tensor, threshold: float) -> torch.Tensor:
    """Official DINO masks: per row, keep the largest values that hold ``threshold`` of the mass.

    attn: (heads, P) non-negative -> bool (heads, P). Sort ascending, normalize, cumulative sum,
    keep entries whose cumulative mass exceeds ``1 - threshold``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold}: must be in [0, 1]")
    val, idx = torch.sort(attn, dim=1)
    val = val / val.sum(dim=1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=1) > (1 - threshold)
    return torch.gather(keep_sorted, 1, torch.argsort(idx, dim=1))


def _patch_size(vit: nn.Module) -> int:
    ps = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    if ps is None:
        raise NoAttentionError(f"{_model_name(vit)}: cannot find the patch size (no patch_embed)")
    ps = tuple(ps) if isinstance(ps, (tuple, list)) else (ps, ps)
    if ps[0] != ps[1]:
        raise ValueError(f"{_model_name(vit)}: non-square patches {ps} are not supported")
    return int(ps[0])


def prepare_image(model: nn.Module, image: Image.Image | str | os.PathLike[str],
                  image_size: int | tuple[int, int] = 480) -> tuple[torch.Tensor, Image.Image]:
    """As the official visualize_attention.py: resize (an int resizes the short side, an (h, w) pair
    resizes exactly), normalize with the model's mean/std, crop to a multiple of the patch size.

    Returns the tensor (1, 3, H, W) and the matching RGB PIL image (W x H).
    """
    from torchvision.transforms import functional as TF

    from dinokit.data.images import load_rgb, to_rgb

    vit = _vit(model)
    p = _patch_size(vit)
    img = load_rgb(image) if isinstance(image, (str, os.PathLike)) else to_rgb(image)
    size = [int(image_size)] if isinstance(image_size, int) else [int(s) for s in image_size]
    img = TF.resize(img, size, antialias=True)
    w, h = img.size
    h2, w2 = h - h % p, w - w % p
    if h2 == 0 or w2 == 0:
        raise ValueError(f"image of {w}x{h} px is smaller than one {p}px patch; use a larger image_size")
    img = img.crop((0, 0, w2, h2))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    x = TF.normalize(TF.to_tensor(img), list(mean), list(std))
    return x.unsqueeze(0), img


@torch.no_grad()
def attention_maps(model: nn.Module, image: Image.Image | str | os.PathLike[str],
                   image_size: int | tuple[int, int] = 480, threshold: float | None = 0.6,
                   device: str | torch.device | None = None) -> AttentionMaps:
    """Per-head CLS-to-patch attention maps of ``image`` at image resolution, plus the official masks.

    ``image_size``: int = short side (aspect kept), or (h, w). ``threshold``: share of the attention
    mass each mask keeps (0.6 as official; None for no masks).
    """
    vit = _vit(model)
    p = _patch_size(vit)
    if getattr(vit, "cls_token", None) is None:
        raise NoAttentionError(f"{_model_name(model)}: model has no CLS token, so there is no CLS attention")
    x, img = prepare_image(model, image, image_size)
    dev = torch.device(device) if device is not None else next(vit.parameters()).device
    attn = last_selfattention(model, x.to(dev))  # (1, heads, N, N)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    h, w = x.shape[-2] // p, x.shape[-1] // p
    nh = attn.shape[1]
    cls_attn = attn[0, :, 0, prefix:].float()
    if cls_attn.shape[1] != h * w:
        raise RuntimeError(f"expected {h}x{w} patch tokens, got {cls_attn.shape[1]}")
    patch_maps = cls_attn.reshape(nh, h, w)
    up = torch.nn.functional.interpolate(patch_maps[None], scale_factor=p, mode="nearest")[0]
    masks = None
    if threshold is not None:
        m = threshold_masks(cls_attn, threshold).reshape(nh, h, w).float()
        masks = torch.nn.functional.interpolate(m[None], scale_factor=p, mode="nearest")[0].cpu().numpy() > 0.5
    heads = up.cpu().numpy().astype(np.float32)
    return AttentionMaps(image=img, heads=heads, mean=heads.mean(axis=0), masks=masks,
                         patch_maps=patch_maps.cpu().numpy().astype(np.float32), threshold=threshold,
                         patch_size=p)


# ---------------------------------------------------------------------------- pictures


def heatmap(values: np.ndarray, cmap: str = "viridis") -> Image.Image:
    """(H, W) floats -> an RGB heatmap image, min-max scaled."""
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    rgba = matplotlib.colormaps[cmap](v)
    return Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8), mode="RGB")


def overlay(image: Image.Image, values: np.ndarray, alpha: float = 0.6, cmap: str = "inferno") -> Image.Image:
    """Blend a heatmap of ``values`` (H, W) over ``image`` (W x H); alpha = heatmap weight."""
    hm = heatmap(values, cmap)
    base = image.convert("RGB")
    if hm.size != base.size:
        hm = hm.resize(base.size, Image.Resampling.NEAREST)
    return Image.blend(base, hm, alpha)


def mask_image(mask: np.ndarray) -> Image.Image:
    """bool (H, W) -> black/white "L" image."""
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def _atomic_save(img: Image.Image, path: Path, **kw: Any) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"), **kw)


def save_attention(maps: AttentionMaps, out_dir: str | os.PathLike[str], cmap: str = "viridis") -> list[Path]:
    """Write the official set of pictures into ``out_dir``: img.png, attn-head{j}.png, attn-mean.png,
    mask_th{threshold}_head{j}.png (when masks exist), overlay.png (mean map on the image),
    overlay-head{j}.png. Returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def put(img: Image.Image, name: str) -> None:
        path = out / name
        _atomic_save(img, path)
        written.append(path)

    put(maps.image, "img.png")
    for j, m in enumerate(maps.heads):
        put(heatmap(m, cmap), f"attn-head{j}.png")
    put(heatmap(maps.mean, cmap), "attn-mean.png")
    if maps.masks is not None:
        for j, m in enumerate(maps.masks):
            put(mask_image(m), f"mask_th{maps.threshold}_head{j}.png")
    put(overlay(maps.image, maps.mean), "overlay.png")
    for j, m in enumerate(maps.heads):
        put(overlay(maps.image, m), f"overlay-head{j}.png")
    return written


def frames_gif(model: nn.Module, frames: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
               out_path: str | os.PathLike[str], image_size: int | tuple[int, int] = 480,
               head: int | None = None, fps: float = 10.0, alpha: float = 0.6,
               progress: Progress | None = None) -> Path:
    """An animated GIF of attention overlays, one frame per image of ``frames`` (a folder of video
    frames, sorted by name, or a list of paths). ``head``: one head's map, or None for the mean."""
    from dinokit.data.images import list_images

    paths = list_images(frames) if isinstance(frames, (str, os.PathLike)) else [Path(p) for p in frames]
    if not paths:
        raise ValueError(f"{frames}: no frames (image files) found")
    pictures: list[Image.Image] = []
    for i, p in enumerate(paths):
        maps = attention_maps(model, p, image_size=image_size, threshold=None)
        if head is not None and not 0 <= head < len(maps.heads):
            raise ValueError(f"head={head}: the model has {len(maps.heads)} heads")
        values = maps.mean if head is None else maps.heads[head]
        pic = overlay(maps.image, values, alpha=alpha)
        if pictures and pic.size != pictures[0].size:
            pic = pic.resize(pictures[0].size, Image.Resampling.BILINEAR)  # a GIF has one canvas size
        pictures.append(pic)
        if progress is not None:
            progress(i + 1, len(paths))
    out = Path(out_path)
    with atomic_path(out) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:],
                         duration=max(1, round(1000 / fps)), loop=0)
    return out
