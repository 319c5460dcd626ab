"""Make the reference tensors in this folder with the official DINO / DINOv2 / DINOv3 code.

Not run by the tests: it needs checkouts of facebookresearch/dino, dinov2 and dinov3 (never part of
this repository). It builds tiny models with the official classes, gives them random "trained-like"
weights (layer-scale gammas, norm weights and biases randomized; DINOv3's k bias nonzero behind
its bias_mask) and writes, per model, ``<name>.safetensors`` holding the official state dict
(keys ``sd.*``) and the official outputs (keys ``out.*``: CLS at two sizes, patch tokens, registers
and the first 8 rows of the last attention at the second size) for inputs
``torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(seed))``, plus provenance.json
(code commits, arguments, torch version).

    python tests/data/official/make_reference.py --official /tmp/official
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
SIZES = {"p14": [(224, 224), (238, 322)], "p16": [(224, 224), (240, 320)]}


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point() or name.endswith(("periods", "bias_mask")) or name == "mask_token":
                continue
            if name.endswith(("ls1.gamma", "ls2.gamma", ".gamma")):
                p.copy_(0.2 + torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name in ("pos_embed", "cls_token", "register_tokens", "storage_tokens"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def models(root: Path) -> dict[str, tuple[dict, object]]:
    """name -> (arguments recorded in provenance, constructor)."""
    for sub in ("dino", "dinov2", "dinov3"):
        sys.path.insert(0, str(root / sub))
    import vision_transformer as v1  # facebookresearch/dino
    from dinov2.layers import MemEffAttention
    from dinov2.layers.block import Block
    from dinov2.models.vision_transformer import DinoVisionTransformer as V2
    from dinov3.models.convnext import ConvNeXt
    from dinov3.models.vision_transformer import DinoVisionTransformer as V3

    def v2(**kw: object) -> torch.nn.Module:
        return V2(block_fn=partial(Block, attn_class=MemEffAttention), **kw)

    def v3(**kw: object) -> torch.nn.Module:
        m = V3(**kw)
        m.init_weights()  # RoPE periods and the (1, 0, 1) bias mask
        return m

    a1 = dict(patch_size=16, embed_dim=32, depth=2, num_heads=1, mlp_ratio=4, qkv_bias=True)
    a2 = dict(img_size=224, patch_size=14, embed_dim=32, depth=2, num_heads=1, mlp_ratio=4, init_values=1.0,
              block_chunks=0, interpolate_offset=0.1, interpolate_antialias=False)
    a2r = {**a2, "num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}
    a2g = {**a2, "ffn_layer": "swiglufused"}
    a3 = dict(img_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=1, ffn_ratio=4, qkv_bias=True,
              layerscale_init=1e-5, norm_layer="layernormbf16", n_storage_tokens=4, mask_k_bias=True,
              pos_embed_rope_base=100, pos_embed_rope_normalize_coords="separate", pos_embed_rope_dtype="fp32")
    a3s = {**a3, "ffn_layer": "swiglu", "ffn_ratio": 6}
    ac = dict(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32])
    return {
        "dino_v1": (a1, lambda: v1.VisionTransformer(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **a1)),
        "dinov2": (a2, lambda: v2(**a2)),
        "dinov2_reg": (a2r, lambda: v2(**a2r)),
        "dinov2_swiglu": (a2g, lambda: v2(**a2g)),
        "dinov3": (a3, lambda: v3(**a3)),
        "dinov3_swiglu": (a3s, lambda: v3(**a3s)),
        "dinov3_convnext": (ac, lambda: ConvNeXt(**ac)),
    }


@torch.no_grad()
def outputs(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for i, (h, w) in enumerate(SIZES["p14" if name.startswith("dinov2") else "p16"]):
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(i))
        out[f"out.cls_{h}x{w}"] = model(x)
        if name not in ("dino_v1", "dinov3_convnext") and i == 1:
            feats = model.forward_features(x)
            out[f"out.patch_{h}x{w}"] = feats["x_norm_patchtokens"]
            regs = feats.get("x_norm_regtokens", feats.get("x_storage_tokens"))
            if regs is not None and regs.shape[1]:
                out[f"out.registers_{h}x{w}"] = regs
        if name.startswith(("dinov2", "dinov3")) and name != "dinov3_convnext" and i == 1:
            out[f"out.attn_{h}x{w}"] = last_attention(model, x)[:, :, :8].contiguous()  # first 8 query rows
    return out


def last_attention(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) of the last block, recomputed from its input (with RoPE for DINOv3)."""
    captured = {}
    blk = model.blocks[-1]
    handle = blk.attn.register_forward_pre_hook(lambda m, a, kw: captured.update(x=a[0], kw=kw, a=a),
                                                with_kwargs=True)
    model(x)
    handle.remove()
    attn, t = blk.attn, captured["x"]
    B, N, _ = t.shape
    bias = attn.qkv.bias * attn.qkv.bias_mask if hasattr(attn.qkv, "bias_mask") else attn.qkv.bias
    qkv = torch.nn.functional.linear(t, attn.qkv.weight, bias).reshape(B, N, 3, attn.num_heads, -1)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    rope = captured["kw"].get("rope", captured["a"][1] if len(captured["a"]) > 1 else None)
    if rope is not None:
        q, k = attn.apply_rope(q, k, rope)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", type=Path, required=True)
    args = ap.parse_args()
    prov: dict[str, object] = {"torch": torch.__version__, "models": {}, "commits": {}}
    for sub in ("dino", "dinov2", "dinov3"):
        mirror = Path(f"/work/.mirror/facebookresearch+{sub}/repo")
        rev = subprocess.run(["git", f"--git-dir={mirror}", "rev-parse", "HEAD"], capture_output=True, text=True)
        prov["commits"][f"facebookresearch/{sub}"] = rev.stdout.strip() or "unknown"
    for i, (name, (kwargs, make)) in enumerate(models(args.official).items()):
        torch.manual_seed(i)
        model = make().eval()
        randomize(model, seed=100 + i)
        tensors = {f"sd.{k}": v.clone().contiguous() for k, v in model.state_dict().items()}
        tensors.update({k: v.contiguous() for k, v in outputs(name, model).items()})
        save_file(tensors, str(HERE / f"{name}.safetensors"))
        prov["models"][name] = {"class_args": {k: v for k, v in kwargs.items()}, "randomize_seed": 100 + i,
                                "outputs": sorted(k for k in tensors if k.startswith("out."))}
    (HERE / "provenance.json").write_text(json.dumps(prov, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
