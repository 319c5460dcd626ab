"""Checkpoint layouts -> timm state dicts, and the architecture read off the tensors.

Layouts handled:

- official DINO backbone-only ``.pth``: keys are already timm ViT (or torchvision ResNet) keys;
- official DINO full training checkpoint ``{"student", "teacher", ...}`` (and dinokit's own, which
  adds ``backbone_config``): ``module.`` / ``backbone.`` prefixes stripped, DINO head dropped;
- HF transformers ``ViTModel`` (``embeddings.*``, ``encoder.layer.N.*``): renamed to timm keys,
  separate query/key/value fused into one ``qkv`` projection.

Nothing here builds a model or reads a file: inputs and outputs are plain dicts.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from dinokit._validate import expect, expect_mapping, parse_json

log = logging.getLogger(__name__)

FULL_CHECKPOINT_KEYS = ("teacher", "student")
# Classifier weights a headless backbone (num_classes=0) has no place for.
_CLASSIFIER_KEYS = ("head.weight", "head.bias", "fc.weight", "fc.bias")
# Canonical timm names for DINO-sized ViTs: (width, depth, patch) -> arch.
_VIT_ARCHS = {
    (192, 12, 16): "vit_tiny_patch16_224",
    (384, 12, 16): "vit_small_patch16_224",
    (384, 12, 8): "vit_small_patch8_224",
    (768, 12, 16): "vit_base_patch16_224",
    (768, 12, 8): "vit_base_patch8_224",
    (1024, 24, 16): "vit_large_patch16_224",
}
# DINOv2 (width, depth, patch, SwiGLU) -> timm arch (the _reg4_ variant when registers are present).
_DINOV2_ARCHS = {
    (384, 12, 14, False): "vit_small_patch14_dinov2",
    (768, 12, 14, False): "vit_base_patch14_dinov2",
    (1024, 24, 14, False): "vit_large_patch14_dinov2",
    (1536, 40, 14, True): "vit_giant_patch14_dinov2",
}
# (block kind, blocks per stage, stage-1 width) -> timm ResNet arch (same keys as torchvision).
_RESNET_ARCHS: dict[tuple[str, tuple[int, ...], int], str] = {
    ("basic", (2, 2, 2, 2), 64): "resnet18",
    ("basic", (3, 4, 6, 3), 64): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 64): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 64): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 64): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 128): "wide_resnet50_2",
    ("bottleneck", (3, 4, 23, 3), 128): "wide_resnet101_2",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into a backbone; message "SOURCE: reason"."""


# ------------------------------------------------------------------------------------ layouts


def is_full_checkpoint(obj: Any) -> bool:
    """True for an official/dinokit training checkpoint holding student and teacher state dicts."""
    return isinstance(obj, Mapping) and all(isinstance(obj.get(k), Mapping) for k in FULL_CHECKPOINT_KEYS)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that starts with it (other keys are kept unchanged)."""
    n = len(prefix)
    return {(k[n:] if k.startswith(prefix) else k): v for k, v in sd.items()}


def backbone_from_wrapper(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINO's MultiCropWrapper state dict (optionally DDP-wrapped) -> backbone keys only.

    ``module.backbone.blocks.0...`` -> ``blocks.0...``; the DINO head (``head.*``) is dropped.
    """
    sd = strip_prefix(sd, "module.")
    if any(k.startswith("backbone.") for k in sd):
        dropped = [k for k in sd if not k.startswith("backbone.")]
        if dropped:
            log.debug("dropping %d non-backbone keys (DINO head): %s...", len(dropped), dropped[:3])
        return {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return dict(sd)


def unwrap_checkpoint(obj: Any, source: str, which: str = "teacher") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any loaded checkpoint object -> (backbone state dict, extras).

    extras may hold ``backbone_config`` (dict) and ``config`` (dict) from dinokit checkpoints, and
    ``layout`` naming what was found. ``which`` picks teacher or student in full checkpoints.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}: expected 'teacher' or 'student'")
    extras: dict[str, Any] = {}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: not a state dict or checkpoint (found {type(obj).__name__})")
    if is_full_checkpoint(obj):
        extras["layout"] = f"full-checkpoint:{which}"
        for key in ("backbone_config", "config"):
            if key in obj:
                extras[key] = _json_or_dict(obj[key], source, key)
        if "epoch" in obj:
            extras["epoch"] = int(expect(obj["epoch"], (int, float), source, "epoch", error=CheckpointError))
        sd = backbone_from_wrapper(obj[which])
    else:
        if which == "student":
            raise CheckpointError(f"{source}: which='student' needs a full training checkpoint; "
                                  "this file holds a single backbone")
        for key in ("state_dict", "model", "backbone"):  # common single-model wrappers
            if key in obj and isinstance(obj[key], Mapping) and _looks_like_state_dict(obj[key]):
                obj = obj[key]
                break
        if not _looks_like_state_dict(obj):
            raise CheckpointError(f"{source}: no tensors found (keys: {', '.join(map(str, list(obj)[:8]))})")
        sd = backbone_from_wrapper(obj)
        extras["layout"] = "state-dict"
    sd, family = convert_family(sd)
    if family:
        extras.update(family)
        extras["layout"] += f"+{family['layout']}"
    return sd, extras


def convert_family(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Recognize the official DINOv2 / DINOv3 and HF transformers layouts and convert them to timm
    keys. Returns (state dict, info); info is empty for layouts that already are timm keys (DINO
    v1 official files). info keys: ``layout``, ``family``, ``pos_embed_resize``, ``model_args``.
    """
    # imported here: these modules import CheckpointError from this one
    from dinokit.models import convnext, dinov2, dinov3

    info: dict[str, Any] = {}
    if convnext.is_hf_convnext(sd):
        sd = convnext.hf_convnext_to_official(sd)
    if convnext.is_official_convnext(sd):
        return convnext.official_convnext_to_timm(sd), {"layout": "dinov3-convnext", "family": "dinov3_convnext"}
    if dinov3.is_hf_dinov3(sd):
        sd, info["layout"] = dinov3.hf_dinov3_to_official(sd), "hf-dinov3"
    elif dinov2.is_hf_dinov2(sd):
        sd, info["layout"] = dinov2.hf_dinov2_to_official(sd), "hf-dinov2"
    elif is_hf_vit(sd):
        return hf_vit_to_timm(sd), {"layout": "hf-vit", "family": "dino"}
    if dinov3.is_official_dinov3(sd):
        sd, found = dinov3.dinov3_to_timm(sd)
        info.setdefault("layout", "dinov3")
        info.update(family="dinov3", model_args={"num_heads": found["num_heads"]} if "num_heads" in found else {})
    elif dinov2.is_official_dinov2(sd):
        sd, found = dinov2.dinov2_to_timm(sd)
        info.setdefault("layout", str(found["family"]))
        info.update(family=found["family"], pos_embed_resize=found["pos_embed_resize"],
                    model_args={"no_embed_class": True} if found["family"] == "dinov2_reg" else {})
    return sd, info


def _looks_like_state_dict(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and any(
        isinstance(v, torch.Tensor) for v in obj.values())


def _json_or_dict(value: Any, source: str, key: str) -> dict[str, Any]:
    if isinstance(value, str):  # bounded parse: a checkpoint is not trusted
        value = parse_json(value, f"{source}: {key}", error=CheckpointError)
    return expect_mapping(value, source, key, error=CheckpointError)


def drop_classifier(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove classification-head weights (``head.*`` / ``fc.*``): backbones are headless."""
    dropped = [k for k in _CLASSIFIER_KEYS if k in sd]
    if dropped:
        log.info("dropping classifier weights %s (backbones are headless)", dropped)
    return {k: v for k, v in sd.items() if k not in _CLASSIFIER_KEYS}


# ------------------------------------------------------------------------------------ HF ViT

_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_BLOCK_MAP = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def is_hf_vit(sd: Mapping[str, Any]) -> bool:
    """True for HF transformers ViT key names (optionally under ``vit.``)."""
    return any(k.startswith(("embeddings.patch_embeddings.", "vit.embeddings.patch_embeddings.")) for k in sd)


def hf_vit_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF transformers ViTModel state dict -> timm VisionTransformer keys.

    query/key/value (D, D) each are stacked into ``attn.qkv`` (3D, D) in q, k, v order (timm's
    layout); the pooler, the masked-image-modeling mask token and any classifier are dropped.
    """
    sd = strip_prefix(sd, "vit.")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        if k in _HF_TOP_MAP:
            out[_HF_TOP_MAP[k]] = v
            continue
        if k.startswith(("pooler.", "classifier.")) or k == "embeddings.mask_token":
            log.info("dropping %s (not part of the DINO backbone)", k)
            continue
        m = _HF_LAYER.match(k)
        if m is None:
            unknown.append(k)
            continue
        i, rest = int(m.group(1)), m.group(2)
        am = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if am:
            qkv.setdefault((i, am.group(2)), {})[am.group(1)] = v
            continue
        for hf_name, timm_name in _HF_BLOCK_MAP.items():
            if rest.startswith(hf_name + "."):
                out[f"blocks.{i}.{timm_name}{rest[len(hf_name):]}"] = v
                break
        else:
            unknown.append(k)
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"block {i}: incomplete attention {kind} (found {sorted(parts)})")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    # Unknown keys are kept: the strict load then names them as unexpected.
    out.update({k: sd[k] for k in unknown})
    return out


def split_qkv_to_hf(layer: str, rest: str, v: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    """Block ``layer``'s fused ``attn.qkv.{weight,bias}`` (``rest``) -> HF's separate query / key /
    value entries in ``out``; False (nothing written) for any other tensor."""
    if not rest.startswith("attn.qkv."):
        return False
    kind = rest.rsplit(".", 1)[1]
    for name, t in zip(("query", "key", "value"), v.chunk(3, dim=0), strict=True):
        out[f"encoder.layer.{layer}.attention.attention.{name}.{kind}"] = t.clone()
    return True


def timm_vit_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_vit_to_timm` (timm ViT -> HF ViTModel keys, without pooler)."""
    top = {v: k for k, v in _HF_TOP_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        if m is None:
            raise KeyError(f"{k}: no HF ViT equivalent")
        i, rest = m.group(1), m.group(2)
        if split_qkv_to_hf(i, rest, v, out):
            continue
        for hf_name, timm_name in _HF_BLOCK_MAP.items():
            if rest.startswith(timm_name + "."):
                out[f"encoder.layer.{i}.{hf_name}{rest[len(timm_name):]}"] = v
                break
        else:
            raise KeyError(f"{k}: no HF ViT equivalent")
    return out


def hf_vit_config_to_model_args(hf: Mapping[str, Any]) -> dict[str, Any]:
    """HF ``ViTConfig`` fields -> timm VisionTransformer arguments (LayerNorm eps is DINO's 1e-6)."""
    d = int(hf["hidden_size"])
    args: dict[str, Any] = {
        "embed_dim": d,
        "depth": int(hf["num_hidden_layers"]),
        "num_heads": int(hf["num_attention_heads"]),
        "patch_size": int(hf.get("patch_size", 16)),
        "img_size": int(hf.get("image_size", 224)),
        "mlp_ratio": int(hf.get("intermediate_size", 4 * d)) / d,
        "qkv_bias": bool(hf.get("qkv_bias", True)),
    }
    if int(hf.get("num_channels", 3)) != 3:
        args["in_chans"] = int(hf["num_channels"])
    return args


# ------------------------------------------------------------------------------------ inference


def infer_config(sd: Mapping[str, torch.Tensor], source: str,
                 model_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The backbone config (``{"architecture", "model_args"}``) that ``sd`` was saved from.

    ViT: width, depth, patch size, MLP ratio, qkv bias, registers, layer scale and the training
    image size (from the position-embedding grid) are read off tensor shapes; heads are width / 64
    (DINO's head size) unless ``model_args`` gives ``num_heads``. ResNet: torchvision key names.
    ``model_args`` entries override what was inferred.
    """
    try:  # shapes of a tampered file may have too few dimensions
        if "patch_embed.proj.weight" in sd and "pos_embed" not in sd and "reg_token" in sd:
            from dinokit.models.dinov3 import infer_dinov3  # RoPE ViT (Eva): no position table

            cfg = infer_dinov3(sd, source, (model_args or {}).get("num_heads"))
        elif "patch_embed.proj.weight" in sd:
            cfg = _infer_vit(sd, source, model_args or {})
        elif "stem.0.weight" in sd and "stages.0.blocks.0.conv_dw.weight" in sd:
            from dinokit.models.convnext import infer_convnext

            cfg = infer_convnext(sd, source)
        elif "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
            cfg = _infer_resnet(sd, source)
        else:
            cfg = None
    except (IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source}: tensor shapes do not fit a ViT, ConvNeXt or ResNet "
                              f"({type(e).__name__}: {e})") from e
    if cfg is None:
        sample = ", ".join(list(sd)[:6])
        raise CheckpointError(f"{source}: cannot tell the architecture (not a ViT, ConvNeXt or ResNet; "
                              f"keys: {sample}, ...)")
    cfg["model_args"].update(model_args or {})
    return cfg


def _infer_vit(sd: Mapping[str, torch.Tensor], source: str, given: Mapping[str, Any]) -> dict[str, Any]:
    w = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    width, in_chans, ph, pw = (int(s) for s in w.shape)
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"{source}: ViT patch embedding but no blocks.N.* keys")
    heads = given.get("num_heads")
    if heads is None:
        if width % 64:
            raise CheckpointError(f"{source}: cannot infer the number of heads for width {width} "
                                  "(not a multiple of DINO's 64-d heads); save the model with a config.json")
        heads = width // 64
    mlp_hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in sd else 4 * width
    # SwiGLU (DINOv2 ViT-g) in timm's packed form: fc1 gives gate and value, fc2 takes half of it
    swiglu = "blocks.0.mlp.fc2.weight" in sd and mlp_hidden == 2 * int(sd["blocks.0.mlp.fc2.weight"].shape[1])
    n_reg = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    has_cls = "cls_token" in sd
    n_prefix = int(has_cls) + n_reg
    args: dict[str, Any] = {}
    if "pos_embed" in sd:
        n_pos = int(sd["pos_embed"].shape[1])
        no_embed_class = bool(given.get("no_embed_class", False))
        grid = math.isqrt(n_pos) if no_embed_class else math.isqrt(max(n_pos - n_prefix, 0))
        if not no_embed_class and grid * grid != n_pos - n_prefix:
            grid, no_embed_class = math.isqrt(n_pos), True
        if grid * grid != n_pos - (0 if no_embed_class else n_prefix):
            raise CheckpointError(f"{source}: position embedding of {n_pos} tokens is not a square grid "
                                  f"(+{n_prefix} prefix tokens)")
        if no_embed_class and n_prefix:
            args["no_embed_class"] = True
        args["img_size"] = grid * ph
    arch = _DINOV2_ARCHS.get((width, depth, ph, swiglu)) if ph == 14 or swiglu else _VIT_ARCHS.get((width, depth, ph))
    if arch and n_reg and "dinov2" in arch:
        arch = arch.replace("_patch14_dinov2", "_patch14_reg4_dinov2")
    if arch is None or heads != width // 64 or ph != pw:
        arch = "vit_giant_patch14_dinov2" if swiglu else "vit_base_patch16_224"
        args.update(embed_dim=width, depth=depth, num_heads=int(heads), patch_size=ph if ph == pw else [ph, pw])
    if swiglu or mlp_hidden != 4 * width:
        args["mlp_ratio"] = mlp_hidden / width
    if "blocks.0.attn.qkv.weight" in sd and "blocks.0.attn.qkv.bias" not in sd:
        args["qkv_bias"] = False
    if "blocks.0.ls1.gamma" in sd:
        args["init_values"] = 1e-5  # any value: it only switches layer scale on; the weights set it
    if "blocks.0.attn.q_norm.weight" in sd:
        args["qk_norm"] = True
    if n_reg:
        args["reg_tokens"] = n_reg
    if not has_cls:
        args["class_token"] = False
        args["global_pool"] = "avg"
    if in_chans != 3:
        args["in_chans"] = in_chans
    if args.get("img_size") == 224:
        args.pop("img_size")
    return {"architecture": arch, "model_args": args}


def _infer_resnet(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"^layer{stage}\.(\d+)\.", k))}
        blocks.append(len(idx))
    width = int(sd["layer1.0.conv1.weight"].shape[0])
    arch = _RESNET_ARCHS.get((kind, tuple(blocks), width))
    if arch is None:
        raise CheckpointError(f"{source}: unknown ResNet ({kind} blocks {blocks}, stage-1 width {width})")
    return {"architecture": arch, "model_args": {}}


# ------------------------------------------------------------------------------------ checks


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Compare ``sd`` with what ``model`` expects; raise :class:`CheckpointError` naming every
    missing key, unexpected key and shape mismatch. Returns ``sd`` ready for a strict load
    (BatchNorm ``num_batches_tracked`` counters, which carry no weights, are filled in when absent).
    """
    expected = model.state_dict()
    sd = dict(sd)
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v.clone()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (file != model): {_short(shapes)}")
    if problems:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise CheckpointError(f"{source}: does not fit {arch}: " + "; ".join(problems))
    return sd


def _short(items: list[str], n: int = 8) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
