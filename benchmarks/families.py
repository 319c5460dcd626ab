"""Parity of timm and dinokit with the official DINO / DINOv2 / DINOv3 code, per family and size.

Runs the official model code (a checkout of facebookresearch/dino, dinov2 and dinov3 given with
--official; never part of this repository) with random weights made "trained-like" (layer-scale
gammas in [0.2, 1.2], norm weights 1 + N(0, 0.1), biases N(0, 0.1), position table and tokens
N(0, 0.5), the k part of DINOv3's qkv bias nonzero so only the bias_mask removes it), saves the
official state dict as the official .pth, and compares the normalized CLS token (the official hub
forward) of:

- timm, loaded the way timm loads these files (its own checkpoint filters), with
  ``dynamic_img_size=True``;
- dinokit.load of the same .pth.

Writes a Markdown table (max abs difference to the official output) to stdout, or --out FILE.

    python benchmarks/families.py --official /tmp/official [--threads 2] [--onnx]

--official DIR must hold dino/ (vision_transformer.py, utils.py), dinov2/ and dinov3/ checkouts.
--onnx adds onnxruntime-vs-torch images/s of an exported DINOv2-reg ViT-S/14 at 224 px.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import dinokit
from dinokit.devices import cpu_vector_extensions


def randomize(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Give ``model`` trained-like random weights in place; returns its (official) state dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point() or name.endswith("periods"):
                continue
            if name.endswith("bias_mask"):
                continue  # keep the official (1, 0, 1) mask
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.copy_(0.2 + torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name in ("pos_embed", "cls_token", "register_tokens", "storage_tokens"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name != "mask_token":
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def official_models(root: Path) -> dict[str, Callable[[], torch.nn.Module]]:
    """Constructors of the official ViT-S of each family (random init)."""
    for sub in ("dino", "dinov2", "dinov3"):
        sys.path.insert(0, str(root / sub))
    import vision_transformer as dino_vit  # facebookresearch/dino
    from dinov2.hub.backbones import dinov2_vits14, dinov2_vits14_reg
    from dinov3.hub.backbones import dinov3_convnext_tiny, dinov3_vits16

    return {
        "dino_vits16": lambda: dino_vit.vit_small(patch_size=16),
        "dinov2_vits14": lambda: dinov2_vits14(pretrained=False),
        "dinov2_vits14_reg": lambda: dinov2_vits14_reg(pretrained=False),
        "dinov3_vits16": lambda: _v3(dinov3_vits16),
        "dinov3_convnext_tiny": lambda: dinov3_convnext_tiny(pretrained=False),
    }


def _v3(make: Callable[..., torch.nn.Module]) -> torch.nn.Module:
    model = make(pretrained=False)
    model.init_weights()  # fills the RoPE periods and the bias mask
    return model


def timm_as_timm_loads_it(name: str, sd: dict[str, torch.Tensor], built_at: int | None = None,
                          arch: str | None = None, **kwargs: object) -> torch.nn.Module:
    """The official state dict in timm's model, through timm's own checkpoint filter."""
    import timm
    from timm.models import eva, vision_transformer

    arch = arch or {"dino_vits16": "vit_small_patch16_224", "dinov2_vits14": "vit_small_patch14_dinov2",
                    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
                    "dinov3_vits16": "vit_small_patch16_dinov3_qkvb", "dinov3_convnext_tiny": "convnext_tiny"}[name]
    args = {"num_classes": 0, **({} if arch.startswith("convnext") else {"dynamic_img_size": True}), **kwargs}
    if built_at is not None:
        args["img_size"] = built_at
    elif "dinov2" in arch:
        args["img_size"] = 518
    model = timm.create_model(arch, **args).eval()
    from timm.models import convnext

    filt = (eva.checkpoint_filter_fn if "dinov3" in arch else convnext.checkpoint_filter_fn
            if arch.startswith("convnext") else vision_transformer.checkpoint_filter_fn)
    model.load_state_dict(filt(dict(sd), model), strict=False)
    return model


@torch.no_grad()
def gap(a: torch.nn.Module, official: torch.nn.Module, h: int, w: int) -> float:
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
    return float((a(x) - official(x)).abs().max())


def parity_rows(root: Path) -> list[tuple[str, str, str, float]]:
    """(family, variant, size, max abs diff) rows; see the module docstring."""
    rows: list[tuple[str, str, str, float]] = []
    tmp = Path(tempfile.mkdtemp(prefix="dinokit-families-"))
    for i, (name, make) in enumerate(official_models(root).items()):
        official = make().eval()
        sd = randomize(official, seed=i)
        torch.save(sd, tmp / f"{name}.pth")
        mine = dinokit.load(tmp / f"{name}.pth")
        sizes = [(224, 224), (238, 322)] if "14" in name else [(224, 224), (240, 320)]
        variants: list[tuple[str, torch.nn.Module]] = [("dinokit.load", mine)]
        if name == "dinov3_vits16":
            variants += [
                ("timm _qkvb, token pool", timm_as_timm_loads_it(name, sd, global_pool="token")),
                ("timm _qkvb, timm's default (avg) pool", timm_as_timm_loads_it(name, sd)),
                ("timm without _qkvb, token pool",
                 timm_as_timm_loads_it(name, sd, arch="vit_small_patch16_dinov3", global_pool="token")),
            ]
        else:
            variants.append(("timm", timm_as_timm_loads_it(name, sd)))
        if name == "dinov2_vits14":
            variants.append(("timm, built at 224", timm_as_timm_loads_it(name, sd, built_at=224)))
        for variant, model in variants:
            for h, w in sizes:
                rows.append((name, variant, f"{h}x{w}", gap(model, official, h, w)))
    return rows


def onnx_rows(root: Path, batch: int = 8, reps: int = 5) -> list[tuple[str, float]]:
    """images/s of torch and onnxruntime (CPU, fp32) for an exported DINOv2-reg ViT-S/14 at 224."""
    import numpy as np

    from dinokit.onnx import export_onnx, run_onnx

    official = official_models(root)["dinov2_vits14_reg"]().eval()
    sd = randomize(official, seed=7)
    tmp = Path(tempfile.mkdtemp(prefix="dinokit-onnx-"))
    torch.save(sd, tmp / "m.pth")
    model = dinokit.load(tmp / "m.pth")
    res = export_onnx(model, tmp / "m.onnx", image_size=224)
    x = torch.randn(batch, 3, 224, 224)
    out = []
    with torch.inference_mode():
        model(x)
        t = time.perf_counter()
        for _ in range(reps):
            model(x)
        out.append((f"torch {torch.__version__} eager", batch * reps / (time.perf_counter() - t)))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    sess.run(None, feed)
    t = time.perf_counter()
    for _ in range(reps):
        sess.run(None, feed)
    out.append((f"onnxruntime {ort.__version__}", batch * reps / (time.perf_counter() - t)))
    diff = float(np.abs(run_onnx(res.path, x.numpy()) - model(x).detach().numpy()).max())
    out.append(("max abs diff onnxruntime vs torch", diff))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="Folder with dino/, dinov2/, dinov3/ checkouts.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx", action="store_true", help="Also time onnxruntime against torch.")
    ap.add_argument("--out", type=Path, default=None, help="Write the Markdown here (default: stdout).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"Machine: {platform.machine()}, {args.threads} threads, CPU flags {cpu_vector_extensions()}; "
             f"torch {torch.__version__}.", "",
             "| model | variant | input | max abs diff to official (CLS) |", "|---|---|---|---|"]
    for name, variant, size, diff in parity_rows(args.official):
        lines.append(f"| {name} | {variant} | {size} | {diff:.2e} |")
    if args.onnx:
        lines += ["", "| DINOv2-reg ViT-S/14, 224 px, batch 8, fp32 CPU | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in onnx_rows(args.official)]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
