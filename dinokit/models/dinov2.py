"""DINO v1 / DINOv2 / DINOv2-reg: official and HF transformers layouts -> timm ViT, and the
official position-embedding resize.

timm's ``VisionTransformer`` computes the same blocks as the official code; only the position
table at a size other than the trained one differs:

- official DINO v1 and DINOv2 (``interpolate_offset=0.1``): bicubic, no antialias, with
  ``scale_factor = ((h + 0.1) / M, (w + 0.1) / M)`` (M x M: the stored grid), skipped only when the
  input grid is exactly M x M. Because a scale factor (not a size) is passed, PyTorch maps output
  to input coordinates with ``M / (h + 0.1)``, so the result differs from a resize to (h, w).
- official DINOv2 with registers (``interpolate_offset=0``, ``interpolate_antialias=True``): a
  bicubic antialiased resize to exactly (h, w), which is timm's own behaviour.

:class:`OffsetPosEmbedViT` is timm's ViT with the first rule; its weights and config are plain
timm, so saved folders still load in timm.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from dinokit.models.convert import CheckpointError, split_qkv_to_hf

# How a ViT resizes its position table at another input size ("pos_embed_resize" in configs).
POS_EMBED_OFFSET = "offset"  # official DINO v1 / DINOv2: bicubic, scale factor (n + 0.1) / M, no antialias
POS_EMBED_TIMM = "timm"  # timm / DINOv2-reg: bicubic to the exact size, antialias
POS_EMBED_MODES = (POS_EMBED_OFFSET, POS_EMBED_TIMM)
INTERPOLATE_OFFSET = 0.1


def offset_resize(patch_pos: torch.Tensor, grid: tuple[int, int], new: tuple[int, int],
                  offset: float = INTERPOLATE_OFFSET) -> torch.Tensor:
    """The official DINO/DINOv2 resize of a patch position table (1, M*M', D) -> (1, h*w, D).

    Identity when ``new == grid``; otherwise bicubic (no antialias) with scale factor
    ((h + offset) / M, (w + offset) / M'), as ``interpolate_pos_encoding`` does.
    """
    if tuple(new) == tuple(grid):
        return patch_pos
    (gh, gw), (h, w) = grid, new
    dim = patch_pos.shape[-1]
    dtype = patch_pos.dtype
    table = patch_pos.float().reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
    out = F.interpolate(table, scale_factor=((h + offset) / gh, (w + offset) / gw), mode="bicubic",
                        antialias=False)
    if tuple(out.shape[-2:]) != (h, w):  # float rounding of the scale factor: never silently wrong
        raise RuntimeError(f"position resize gave {tuple(out.shape[-2:])}, expected {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(dtype)


def _cubic_matrix(n_out: int | torch.SymInt, n_in: int, scale: float | torch.SymFloat) -> torch.Tensor:
    """(n_out, n_in) weights of PyTorch's bicubic resize (A = -0.75, align_corners=False, border
    indexes clamped) when output i reads input coordinate ``scale * (i + 0.5) - 0.5``."""
    a = -0.75
    # torch's stubs type Tensor * SymFloat as Tensor | SymFloat; it is a tensor
    src = cast(torch.Tensor, (torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5)
    x0 = torch.floor(src)
    t = src - x0

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)
    idx = (x0.long()[:, None] + torch.arange(-1, 3)[None]).clamp(0, n_in - 1)
    return torch.zeros(n_out, n_in).scatter_add(1, idx, w)


def offset_resize_traceable(patch_pos: torch.Tensor, grid: tuple[int, int], new: tuple[int, int],
                            offset: float = INTERPOLATE_OFFSET) -> torch.Tensor:
    """:func:`offset_resize` as two weight matrices, for graph export with symbolic sizes (equal to
    ``F.interpolate`` within float rounding, ~1e-6). The official skip at the stored grid is a blend
    with the identity, so the graph has no size-dependent branch."""
    (gh, gw), (h, w) = grid, new
    dim = patch_pos.shape[-1]
    table = patch_pos.float().reshape(gh, gw, dim)
    same = 1 - torch.clamp(torch.abs(torch.tensor([h - gh, w - gw], dtype=torch.float32)).sum(), max=1.0)
    ah = same * torch.eye(h, gh) + (1 - same) * _cubic_matrix(h, gh, gh / (h + offset))
    aw = same * torch.eye(w, gw) + (1 - same) * _cubic_matrix(w, gw, gw / (w + offset))
    out = torch.einsum("hi,ijd,wj->hwd", ah, table, aw)
    return out.reshape(1, -1, dim).to(patch_pos.dtype)


class OffsetPosEmbedViT(VisionTransformer):
    """timm's ViT with the official DINO v1 / DINOv2 position-embedding resize (see module doc).

    Only ``_pos_embed`` differs; the weights, config and every other method are timm's.
    """

    pos_embed_resize = POS_EMBED_OFFSET

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_img_size or self.pos_embed is None:
            return super()._pos_embed(x)
        B, H, W, C = x.shape
        n_pre = 0 if self.no_embed_class else self.num_prefix_tokens
        pos: torch.Tensor = self.pos_embed
        # torch.export cannot keep F.interpolate's scale factor symbolic: same maths as matrices there
        resize = offset_resize_traceable if torch.compiler.is_exporting() else offset_resize
        patch_pos = resize(pos[:, n_pre:], tuple(self.patch_embed.grid_size), (H, W))
        pos = torch.cat([pos[:, :n_pre], patch_pos], dim=1) if n_pre else patch_pos
        x = x.reshape(B, H * W, C)
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(B, -1, -1))
        if self.no_embed_class:  # registers (and CLS) carry no table entry: add, then prepend
            x = torch.cat([*to_cat, x + pos], dim=1)
        else:
            x = torch.cat([*to_cat, x], dim=1) + pos
        return self.pos_drop(x)


def apply_pos_embed_resize(model: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """Give a timm ViT the official offset resize (``mode="offset"``); other modes leave it as is."""
    if mode in (None, POS_EMBED_TIMM):
        return model
    if mode != POS_EMBED_OFFSET:
        raise ValueError(f"pos_embed_resize={mode!r}: expected one of {', '.join(POS_EMBED_MODES)}")
    if type(model) is VisionTransformer:  # exactly timm's class: swap in the subclass, same state
        model.__class__ = OffsetPosEmbedViT
    elif not isinstance(model, OffsetPosEmbedViT):
        raise ValueError(f"pos_embed_resize='offset' needs a timm VisionTransformer, not {type(model).__name__}")
    return model


def pos_embed_resize_of(model: torch.nn.Module) -> str | None:
    """The resize rule of ``model`` ("offset" / "timm"), None for models without a position table."""
    if isinstance(model, OffsetPosEmbedViT):
        return POS_EMBED_OFFSET
    if getattr(model, "pos_embed", None) is not None:
        return POS_EMBED_TIMM
    return None


# ------------------------------------------------------------------------------------ official v2


def is_official_dinov2(sd: Mapping[str, torch.Tensor]) -> bool:
    """Official DINOv2 backbone keys: a mask token beside a learned position table."""
    return "mask_token" in sd and "pos_embed" in sd and "patch_embed.proj.weight" in sd


def dinov2_to_timm(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Official DINOv2(-reg) state dict -> timm VisionTransformer keys, plus what it is.

    ``mask_token`` (pretraining only) is dropped; SwiGLU ``mlp.w12``/``mlp.w3`` become timm's packed
    ``mlp.fc1``/``mlp.fc2``. Register models become timm's ``no_embed_class`` layout: the CLS
    position entry is folded into ``cls_token`` (the official code adds it to CLS only) and the
    registers, which get no position, become ``reg_token``. Returns (state dict, info) with info
    keys ``family``, ``pos_embed_resize``, ``swiglu``.
    """
    out: dict[str, torch.Tensor] = {}
    regs = sd.get("register_tokens")
    swiglu = False
    for k, v in sd.items():
        if k in ("mask_token", "register_tokens"):
            continue
        m = re.match(r"^(blocks\.\d+\.mlp\.)(w12|w3)\.(weight|bias)$", k)
        if m:
            swiglu = True
            out[f"{m.group(1)}{'fc1' if m.group(2) == 'w12' else 'fc2'}.{m.group(3)}"] = v
            continue
        out[k] = v
    if regs is not None:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
        out["reg_token"] = regs
    info: dict[str, object] = {
        "family": "dinov2_reg" if regs is not None else "dinov2",
        # official: interpolate_offset=0 + antialias for registers (timm's rule), 0.1 offset otherwise
        "pos_embed_resize": POS_EMBED_TIMM if regs is not None else POS_EMBED_OFFSET,
        "swiglu": swiglu,
    }
    return out, info


# ------------------------------------------------------------------------------------ HF Dinov2

_HF_V2_BLOCK = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_V2_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def is_hf_dinov2(sd: Mapping[str, torch.Tensor]) -> bool:
    """HF transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` keys (layer scale present)."""
    sd_keys = [k[len("dinov2."):] if k.startswith("dinov2.") else k for k in sd]
    return "embeddings.patch_embeddings.projection.weight" in sd_keys and any(
        k.endswith("layer_scale1.lambda1") for k in sd_keys)


def hf_dinov2_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Dinov2 keys -> official DINOv2 keys (query/key/value fused into ``attn.qkv``).

    Keys that have no official counterpart are kept as they are, so the strict load names them.
    """
    sd = {(k[len("dinov2."):] if k.startswith("dinov2.") else k): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in _HF_V2_TOP:
            out[_HF_V2_TOP[k]] = v
            continue
        if k.startswith(("pooler.", "classifier.")):
            continue
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", k)
        if m is None:
            out[k] = v
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        am = re.match(r"^attention\.attention\.(query|key|value)$", name)
        if am:
            qkv.setdefault((i, kind), {})[am.group(1)] = v
            continue
        full = f"{name}.{kind}" if kind == "lambda1" else name
        target = _HF_V2_BLOCK.get(full)
        if target is None:
            out[k] = v
        else:
            out[f"blocks.{i}.{target}" + ("" if kind == "lambda1" else f".{kind}")] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"block {i}: incomplete attention {kind} (found {sorted(parts)})")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def official_dinov2_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 keys -> HF Dinov2 keys (the inverse of :func:`hf_dinov2_to_official`)."""
    top = {v: k for k, v in _HF_V2_TOP.items()}
    block = {v: k for k, v in _HF_V2_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        if m is None:
            raise KeyError(f"{k}: no HF Dinov2 equivalent")
        i, rest = m.group(1), m.group(2)
        if split_qkv_to_hf(i, rest, v, out):
            continue
        if rest.endswith(".gamma"):
            out[f"encoder.layer.{i}.{block[rest]}"] = v
            continue
        name, kind = rest.rsplit(".", 1)
        out[f"encoder.layer.{i}.{block[name]}.{kind}"] = v
    return out
