"""DINOv3 ViT: official and HF transformers layouts -> timm's Eva (``vit_*_patch16_dinov3_qkvb``).

timm's Eva with ``rope_type="dinov3"`` computes the official blocks (RoPE with base 100 on
per-axis normalized patch-centre coordinates, 4 storage tokens that get no RoPE, layer scale,
LayerNorm eps 1e-5). Two things must be right when loading:

- the official ``qkv`` is a ``LinearKMaskedBias``: its bias is multiplied by a stored ``bias_mask``
  that zeroes the k third. timm's ``_qkvb`` models hold q and v biases and a fixed zero k bias;
  the ``qkv_bias=False`` models drop the q and v biases altogether (wrong for files that have them);
- the official hub forward returns the normalized CLS token; timm's Eva default pools by average,
  so dinokit builds it with ``global_pool="token"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from dinokit.models.convert import CheckpointError

ROPE_BASE = 100.0
# Official keys used only in pretraining (or buffers timm recomputes): never part of a backbone.
_DROP = ("mask_token",)


def is_official_dinov3(sd: Mapping[str, torch.Tensor]) -> bool:
    """Official DINOv3 ViT keys: storage tokens and the RoPE ``periods`` buffer, no position table."""
    return "storage_tokens" in sd and "patch_embed.proj.weight" in sd and "pos_embed" not in sd


def rope_periods(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """The official RoPE periods: base ** (2 i / (head_dim / 2)), i < head_dim / 4 -> (head_dim // 4,)."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def _masked_qkv_bias(bias: torch.Tensor, mask: torch.Tensor | None, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q bias, v bias) of an official masked qkv bias; the k third must be masked to zero."""
    if mask is not None:
        bias = bias * mask.to(bias.dtype)
    q, k, v = bias.chunk(3)
    if bool(k.abs().max() > 0):
        raise CheckpointError(f"{key}: the k part of the qkv bias is not masked to zero (bias_mask); "
                              "timm's DINOv3 attention has a fixed zero k bias")
    return q, v


def dinov3_to_timm(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Official DINOv3 ViT state dict -> timm Eva keys, plus what it is.

    ``qkv.bias * bias_mask`` is split into Eva's ``q_bias`` / ``v_bias``; ``ls{1,2}.gamma`` ->
    ``gamma_{1,2}``; ``storage_tokens`` -> ``reg_token``; SwiGLU ``w1/w2/w3`` -> ``fc1_g/fc1_x/fc2``;
    ``mask_token``, ``bias_mask`` and ``rope_embed.periods`` are dropped after checking that the
    periods are the base-100 ones timm recomputes. info: ``family``, ``num_heads`` (from the periods),
    ``qkv_bias``, ``swiglu``.
    """
    out: dict[str, torch.Tensor] = {}
    info: dict[str, object] = {"family": "dinov3", "qkv_bias": False, "swiglu": False}
    periods = sd.get("rope_embed.periods")
    if periods is not None:
        head_dim = 4 * int(periods.numel())
        expected = rope_periods(head_dim)
        if not torch.allclose(periods.float(), expected, rtol=1e-4, atol=0):
            raise CheckpointError(f"rope_embed.periods: not the base-{ROPE_BASE:g} RoPE periods timm computes")
        info["num_heads"] = int(sd["patch_embed.proj.weight"].shape[0]) // head_dim
    for k, v in sd.items():
        if k in _DROP or k.endswith((".bias_mask", "rope_embed.periods")) or k.startswith("local_cls_norm."):
            continue  # local_cls_norm: the 7B/sat models' norm for local crops, used in training only
        if k.endswith("attn.qkv.bias"):
            q, vb = _masked_qkv_bias(v, sd.get(k + "_mask"), k)
            out[k.replace("qkv.bias", "q_bias")] = q
            out[k.replace("qkv.bias", "v_bias")] = vb
            info["qkv_bias"] = True
            continue
        m = re.match(r"^(blocks\.\d+\.mlp\.)(w1|w2|w3)\.(weight|bias)$", k)
        if m:
            info["swiglu"] = True
            out[f"{m.group(1)}{ {'w1': 'fc1_g', 'w2': 'fc1_x', 'w3': 'fc2'}[m.group(2)]}.{m.group(3)}"] = v
            continue
        k = k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        out["reg_token" if k == "storage_tokens" else k] = v
    return out, info


# ------------------------------------------------------------------------------------ HF DINOv3ViT

_HF_V3_BLOCK = {
    "norm1": "norm1",
    "attention.o_proj": "attn.proj",
    "norm2": "norm2",
    "mlp.up_proj": "mlp.fc1",  # plain MLP; gated MLPs are mapped below
    "mlp.down_proj": "mlp.fc2",
}
_HF_V3_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def is_hf_dinov3(sd: Mapping[str, torch.Tensor]) -> bool:
    """HF transformers ``DINOv3ViTModel`` keys."""
    return "embeddings.patch_embeddings.weight" in sd and "layer.0.attention.q_proj.weight" in sd


def hf_dinov3_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF DINOv3ViT keys -> official DINOv3 keys: q/k/v fused into ``qkv`` with a zero k bias and
    the matching ``bias_mask``; gated MLP gate/up/down -> ``w1``/``w2``/``w3``. Unknown keys are kept."""
    out: dict[str, torch.Tensor] = {}
    gated = any(k.endswith("mlp.gate_proj.weight") for k in sd)
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in _HF_V3_TOP:
            out[_HF_V3_TOP[k]] = v
            continue
        if k.startswith("rope_embeddings."):
            continue
        m = re.match(r"^layer\.(\d+)\.(.+)$", k)
        if m is None:
            out[k] = v
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            parts.setdefault(i, {})[rest[len("attention."):]] = v
            continue
        if rest.startswith("layer_scale"):
            out[f"blocks.{i}.ls{rest[len('layer_scale')]}.gamma"] = v
            continue
        name, kind = rest.rsplit(".", 1)
        if gated and name.startswith("mlp."):
            target = {"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"}.get(name)
        else:
            target = _HF_V3_BLOCK.get(name)
        out[f"blocks.{i}.{target}.{kind}" if target else k] = v
    for i, p in parts.items():
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([p["q_proj.weight"], p["k_proj.weight"], p["v_proj.weight"]])
        if "q_proj.bias" in p:
            q = p["q_proj.bias"]
            zero = torch.zeros_like(q)
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, zero, p.get("v_proj.bias", zero)])
            out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones_like(q), zero, torch.ones_like(q)])
    return out


def infer_dinov3(sd: Mapping[str, torch.Tensor], source: str, num_heads: int | None = None) -> dict[str, Any]:
    """timm Eva config of a DINOv3 state dict in timm keys (after :func:`dinov3_to_timm`)."""
    w = sd["patch_embed.proj.weight"]
    width, in_chans, ph, pw = (int(s) for s in w.shape)
    if ph != pw:
        raise CheckpointError(f"{source}: non-square patches {ph}x{pw}")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"{source}: DINOv3 patch embedding but no blocks.N.* keys")
    swiglu = "blocks.0.mlp.fc1_g.weight" in sd
    hidden = int(sd["blocks.0.mlp.fc1_g.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0])
    heads = num_heads or width // 64
    qkv_bias = "blocks.0.attn.q_bias" in sd
    ratio = hidden / width
    if int(width * ratio) != hidden:  # float rounding: nudge so timm's int(dim * ratio) is exact
        ratio = (hidden + 0.5) / width
    args: dict[str, object] = {
        "embed_dim": width, "depth": depth, "num_heads": int(heads), "patch_size": ph,
        "mlp_ratio": ratio, "global_pool": "token",
        "num_reg_tokens": int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0,
    }
    if swiglu:
        args.update(swiglu_mlp=True, swiglu_align_to=8)
    if "blocks.0.gamma_1" not in sd:
        args["init_values"] = None
    if in_chans != 3:
        args["in_chans"] = in_chans
    arch = "vit_small_patch16_dinov3_qkvb" if qkv_bias else "vit_small_patch16_dinov3"
    return {"architecture": arch, "model_args": args}
