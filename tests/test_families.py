"""Every DINO family loads from every format and matches the official forward at any image size.

The official forwards are written here from the official formulas (facebookresearch/dino,
dinov2, dinov3), independently of timm: the 0.1-offset position resize (v1, v2), the exact
antialiased resize (v2 with registers), RoPE on per-axis normalized patch centres with the
stored periods and the masked k bias (v3). State dicts in the official layouts are made here with
random weights, randomized layer-scale gammas, norm weights and biases, and a random k bias that
the official ``bias_mask`` must remove, so a wrong mapping cannot pass by chance.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import dinokit
from dinokit.models.backbone import backbone_config, from_backbone_config
from dinokit.models.dinov2 import official_dinov2_to_hf

D, HEADS, DEPTH = 128, 2, 2  # 64-d heads, as every official model (heads are inferred from the width)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(g: torch.Generator, *shape: int, scale: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _norm(g: torch.Generator, prefix: str, dim: int = D) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + _rand(g, dim, scale=0.2), f"{prefix}.bias": _rand(g, dim, scale=0.1)}


def _block(g: torch.Generator, b: str, mlp: str, hidden: int) -> dict[str, torch.Tensor]:
    sd = {**_norm(g, b + "norm1"), **_norm(g, b + "norm2"),
          b + "attn.qkv.weight": _rand(g, 3 * D, D), b + "attn.qkv.bias": _rand(g, 3 * D, scale=0.2),
          b + "attn.proj.weight": _rand(g, D, D), b + "attn.proj.bias": _rand(g, D, scale=0.1),
          b + "ls1.gamma": 0.2 + torch.rand(D, generator=g), b + "ls2.gamma": 0.2 + torch.rand(D, generator=g)}
    if mlp == "mlp":
        sd.update({b + "mlp.fc1.weight": _rand(g, hidden, D), b + "mlp.fc1.bias": _rand(g, hidden, scale=0.1),
                   b + "mlp.fc2.weight": _rand(g, D, hidden), b + "mlp.fc2.bias": _rand(g, D, scale=0.1)})
    elif mlp == "w12":  # DINOv2 ViT-g SwiGLU: packed
        sd.update({b + "mlp.w12.weight": _rand(g, 2 * hidden, D), b + "mlp.w12.bias": _rand(g, 2 * hidden, scale=0.1),
                   b + "mlp.w3.weight": _rand(g, D, hidden), b + "mlp.w3.bias": _rand(g, D, scale=0.1)})
    else:  # DINOv3 S+/H+/7B SwiGLU: w1, w2, w3
        for n, (o, i) in {"w1": (hidden, D), "w2": (hidden, D), "w3": (D, hidden)}.items():
            sd.update({f"{b}mlp.{n}.weight": _rand(g, o, i), f"{b}mlp.{n}.bias": _rand(g, o, scale=0.1)})
    return sd


def official_v2(seed: int = 0, *, registers: int = 0, swiglu: bool = False, grid: int = 37,
                patch: int = 14, mask_token: bool = True) -> dict[str, torch.Tensor]:
    """An official DINO v1 (``mask_token=False``, patch 16, grid 14) or DINOv2(-reg) state dict."""
    g = _g(seed)
    sd = {"cls_token": _rand(g, 1, 1, D, scale=0.5), "pos_embed": _rand(g, 1, 1 + grid * grid, D, scale=0.5),
          "patch_embed.proj.weight": _rand(g, D, 3, patch, patch), "patch_embed.proj.bias": _rand(g, D, scale=0.1),
          **_norm(g, "norm")}
    if mask_token:
        sd["mask_token"] = torch.zeros(1, D)
    if registers:
        sd["register_tokens"] = _rand(g, 1, registers, D, scale=0.5)
    for i in range(DEPTH):
        sd.update(_block(g, f"blocks.{i}.", "w12" if swiglu else "mlp", 192 if swiglu else 4 * D))
    return sd


def official_v3(seed: int = 0, *, swiglu: bool = False, storage: int = 4) -> dict[str, torch.Tensor]:
    """An official DINOv3 ViT state dict (patch 16, RoPE periods, masked k bias)."""
    g = _g(seed)
    head_dim = D // HEADS
    sd = {"cls_token": _rand(g, 1, 1, D, scale=0.5), "storage_tokens": _rand(g, 1, storage, D, scale=0.5),
          "mask_token": torch.zeros(1, D),
          "patch_embed.proj.weight": _rand(g, D, 3, 16, 16), "patch_embed.proj.bias": _rand(g, D, scale=0.1),
          "rope_embed.periods": 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)),
          **_norm(g, "norm")}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update(_block(g, b, "w123" if swiglu else "mlp", 256 if swiglu else 4 * D))
        mask = torch.ones(3 * D)
        mask[D:2 * D] = 0  # the k third: its (random, nonzero) bias must never be applied
        sd[b + "attn.qkv.bias_mask"] = mask
    return sd


# ------------------------------------------------------------------------------------ references


def ref_interpolate(pos: torch.Tensor, h: int, w: int, offset: float, antialias: bool) -> torch.Tensor:
    """Official ``interpolate_pos_encoding``: (1, 1 + M*M, D) -> (1, 1 + h*w, D)."""
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    if h * w == n and h == w:
        return pos
    table = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        out = F.interpolate(table, scale_factor=((h + offset) / m, (w + offset) / m), mode="bicubic",
                            antialias=antialias)
    else:
        out = F.interpolate(table, size=(h, w), mode="bicubic", antialias=antialias)
    assert out.shape[-2:] == (h, w)
    return torch.cat([pos[:, :1], out.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


def _attention(x: torch.Tensor, sd: dict[str, torch.Tensor], b: str, rope: tuple[torch.Tensor, torch.Tensor] | None
               ) -> torch.Tensor:
    """Official attention; returns the attention probabilities too via the global hook below."""
    B, N, _ = x.shape
    bias = sd[b + "attn.qkv.bias"]
    if b + "attn.qkv.bias_mask" in sd:
        bias = bias * sd[b + "attn.qkv.bias_mask"]
    qkv = F.linear(x, sd[b + "attn.qkv.weight"], bias).reshape(B, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if rope is not None:
        sin, cos = rope
        p = N - sin.shape[0]

        def rot(t: torch.Tensor) -> torch.Tensor:
            t1, t2 = t.chunk(2, dim=-1)
            return torch.cat([-t2, t1], dim=-1)

        q = torch.cat([q[:, :, :p], q[:, :, p:] * cos + rot(q[:, :, p:]) * sin], dim=2)
        k = torch.cat([k[:, :, :p], k[:, :, p:] * cos + rot(k[:, :, p:]) * sin], dim=2)
    attn = ((q * (D // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    _LAST_ATTN[0] = attn
    out = (attn @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(out, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])


_LAST_ATTN: list[torch.Tensor] = [torch.empty(0)]


def _mlp(x: torch.Tensor, sd: dict[str, torch.Tensor], b: str) -> torch.Tensor:
    if b + "mlp.w12.weight" in sd:
        x1, x2 = F.linear(x, sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"]).chunk(2, dim=-1)
        return F.linear(F.silu(x1) * x2, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
    if b + "mlp.w1.weight" in sd:
        h = F.silu(F.linear(x, sd[b + "mlp.w1.weight"], sd[b + "mlp.w1.bias"])) * F.linear(
            x, sd[b + "mlp.w2.weight"], sd[b + "mlp.w2.bias"])
        return F.linear(h, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
    return F.linear(F.gelu(F.linear(x, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                    sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])


def _blocks(x: torch.Tensor, sd: dict[str, torch.Tensor], eps: float, rope=None) -> torch.Tensor:
    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (D,), sd[name + ".weight"], sd[name + ".bias"], eps)

    for i in range(DEPTH):
        b = f"blocks.{i}."
        x = x + sd[b + "ls1.gamma"] * _attention(ln(x, b + "norm1"), sd, b, rope)
        x = x + sd[b + "ls2.gamma"] * _mlp(ln(x, b + "norm2"), sd, b)
    return ln(x, "norm")


def ref_v2(sd: dict[str, torch.Tensor], x: torch.Tensor, *, offset: float = 0.1, antialias: bool = False
           ) -> torch.Tensor:
    """Official DINO v1 / DINOv2 forward: all tokens after the final norm, (B, 1 + R + P, D)."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    h, w = x.shape[-2] // p, x.shape[-1] // p
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], dim=1)
    t = t + ref_interpolate(sd["pos_embed"], h, w, offset, antialias)
    if "register_tokens" in sd:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(len(x), -1, -1), t[:, 1:]], dim=1)
    eps = 1e-6
    return _blocks(t, sd, eps)


def ref_rope(periods: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official DINOv3 RoPE tables (sin, cos), each (h*w, head_dim)."""
    ch = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    cw = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).reshape(-1, 2) * 2 - 1
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.sin(angles), torch.cos(angles)


def ref_v3(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Official DINOv3 forward: all tokens after the final norm (eps 1e-5), (B, 1 + S + P, D)."""
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), sd["storage_tokens"].expand(len(x), -1, -1), t], dim=1)
    return _blocks(t, sd, 1e-5, rope=ref_rope(sd["rope_embed.periods"], h, w))


def _x(h: int, w: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=_g(seed))


def _check(model: torch.nn.Module, ref: torch.Tensor, x: torch.Tensor, atol: float = 1e-4) -> float:
    with torch.no_grad():
        got = model(x)
    diff = (got - ref[:, 0]).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.2e} > {atol}"
    return diff


# ------------------------------------------------------------------------------------ v1, v2, v2-reg

V2_SIZES = [(224, 224), (238, 322), (518, 518)]


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_official_pth_matches_official_at_any_size(tmp_path: Path, swiglu: bool) -> None:
    sd = official_v2(1, swiglu=swiglu)
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    model = dinokit.load(tmp_path / "dinov2_vits14_pretrain.pth")
    for h, w in V2_SIZES:
        x = _x(h, w)
        _check(model, ref_v2(sd, x), x)
    # the trap: timm's own resize (exact size, antialias) is measurably different at 238x322
    x = _x(238, 322)
    cfg = backbone_config(model)
    cfg["dinokit"] = {"pos_embed_resize": "timm"}
    plain = from_backbone_config(cfg)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain.eval()(x) - ref_v2(sd, x)[:, 0]).abs().max() > 1e-3


def test_dinov2_reg_official_pth_uses_exact_antialiased_resize(tmp_path: Path) -> None:
    sd = official_v2(2, registers=4)
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    model = dinokit.load(tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    assert model.num_prefix_tokens == 5
    for h, w in V2_SIZES:
        x = _x(h, w)
        _check(model, ref_v2(sd, x, offset=0.0, antialias=True), x)
    # and the registers sit between CLS and the patches, normalized
    x = _x(224, 224)
    with torch.no_grad():
        regs = dinokit.compute_features(model, x, "registers")
        patches = dinokit.compute_features(model, x, "patch")
    ref = ref_v2(sd, x, offset=0.0, antialias=True)
    assert regs.shape == (2, 4, D) and torch.allclose(regs, ref[:, 1:5], atol=1e-4)
    assert patches.shape == (2, 256, D) and torch.allclose(patches, ref[:, 5:], atol=1e-4)


def test_dino_v1_official_pth_uses_offset_resize_at_240x320(tmp_path: Path) -> None:
    sd = official_v2(3, grid=14, patch=16, mask_token=False)
    sd = {k: v for k, v in sd.items() if "ls1" not in k and "ls2" not in k}  # v1 has no layer scale
    for i in range(DEPTH):
        sd[f"blocks.{i}.ls1.gamma"] = sd[f"blocks.{i}.ls2.gamma"] = torch.ones(D)  # reference: identity
    file_sd = {k: v for k, v in sd.items() if ".ls" not in k}
    torch.save(file_sd, tmp_path / "dino_deitsmall16_pretrain.pth")
    model = dinokit.load(tmp_path / "dino_deitsmall16_pretrain.pth")
    for h, w in [(224, 224), (240, 320), (96, 96)]:
        x = _x(h, w)
        _check(model, ref_v2(sd, x), x)


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_folder_matches_official(tmp_path: Path, registers: int) -> None:
    sd = official_v2(4, registers=registers)
    hf = official_dinov2_to_hf(sd)
    folder = tmp_path / "hf"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    mt = "dinov2_with_registers" if registers else "dinov2"
    (folder / "config.json").write_text(f'{{"model_type": "{mt}", "num_attention_heads": {HEADS}, '
                                        f'"hidden_size": {D}}}')
    model = dinokit.load(folder)
    x = _x(238, 322)
    _check(model, ref_v2(sd, x, offset=0.0 if registers else 0.1, antialias=bool(registers)), x)


def test_dinov2_saved_folder_reloads_in_timm_and_dinokit(tmp_path: Path) -> None:
    sd = official_v2(5)
    torch.save(sd, tmp_path / "v2.pth")
    model = dinokit.load(tmp_path / "v2.pth")
    dinokit.save(model, tmp_path / "out")
    again = dinokit.load(tmp_path / "out")
    x = _x(238, 322)
    _check(again, ref_v2(sd, x), x)  # dinokit: official numerics at any size
    via_timm = timm.create_model("local-dir:" + str(tmp_path / "out"), pretrained=True).eval()
    x = _x(518, 518)  # timm: same features at the trained size
    _check(via_timm, ref_v2(sd, x), x)


# ------------------------------------------------------------------------------------ v3

V3_SIZES = [(224, 224), (240, 320), (256, 256)]


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov3_official_pth_matches_official_at_any_size(tmp_path: Path, swiglu: bool) -> None:
    sd = official_v3(6, swiglu=swiglu)
    torch.save(sd, tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    model = dinokit.load(tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    assert model.global_pool == "token"
    for h, w in V3_SIZES:
        x = _x(h, w)
        _check(model, ref_v3(sd, x), x)
    # the trap: applying the whole bias (k part included) changes the features
    unmasked = {k: v for k, v in sd.items() if not k.endswith("bias_mask")}
    x = _x(224, 224)
    with torch.no_grad():
        assert (model(x) - ref_v3(unmasked, x)[:, 0]).abs().max() > 1e-3


def test_dinov3_rejects_unmasked_k_bias(tmp_path: Path) -> None:
    sd = official_v3(7)
    for k in [k for k in sd if k.endswith("bias_mask")]:
        sd[k] = torch.ones_like(sd[k])
    torch.save(sd, tmp_path / "v3.pth")
    with pytest.raises(ValueError, match="k part of the qkv bias"):
        dinokit.load(tmp_path / "v3.pth")


def test_dinov3_features_registers_and_saved_folder(tmp_path: Path) -> None:
    sd = official_v3(8)
    torch.save(sd, tmp_path / "v3.pth")
    model = dinokit.load(tmp_path / "v3.pth")
    x = _x(240, 320)
    ref = ref_v3(sd, x)
    with torch.no_grad():
        assert torch.allclose(dinokit.compute_features(model, x, "registers"), ref[:, 1:5], atol=1e-4)
        assert torch.allclose(dinokit.compute_features(model, x, "patch"), ref[:, 5:], atol=1e-4)
        cls_avg = dinokit.compute_features(model, x, "cls+avgpool")
    assert torch.allclose(cls_avg, torch.cat([ref[:, 0], ref[:, 5:].mean(1)], -1), atol=1e-4)
    dinokit.save(model, tmp_path / "out")
    via_timm = timm.create_model("local-dir:" + str(tmp_path / "out"), pretrained=True).eval()
    _check(via_timm, ref, x)
    _check(dinokit.load(tmp_path / "out"), ref, x)


def test_hf_dinov3_checkpoint_matches_official(tmp_path: Path) -> None:
    sd = official_v3(9, swiglu=True)
    hf: dict[str, torch.Tensor] = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"][None],
                                   "embeddings.register_tokens": sd["storage_tokens"],
                                   "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
                                   "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
                                   "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    for i in range(DEPTH):
        b, o = f"blocks.{i}.", f"layer.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3)
        qb, _, vb = sd[b + "attn.qkv.bias"].chunk(3)
        hf.update({o + "attention.q_proj.weight": q, o + "attention.k_proj.weight": k, o + "attention.v_proj.weight": v,
                   o + "attention.q_proj.bias": qb, o + "attention.v_proj.bias": vb,
                   o + "attention.o_proj.weight": sd[b + "attn.proj.weight"],
                   o + "attention.o_proj.bias": sd[b + "attn.proj.bias"],
                   o + "layer_scale1.lambda1": sd[b + "ls1.gamma"], o + "layer_scale2.lambda1": sd[b + "ls2.gamma"]})
        for n in ("norm1", "norm2"):
            hf.update({f"{o}{n}.weight": sd[f"{b}{n}.weight"], f"{o}{n}.bias": sd[f"{b}{n}.bias"]})
        for hn, on in (("gate_proj", "w1"), ("up_proj", "w2"), ("down_proj", "w3")):
            hf.update({f"{o}mlp.{hn}.weight": sd[f"{b}mlp.{on}.weight"], f"{o}mlp.{hn}.bias": sd[f"{b}mlp.{on}.bias"]})
    torch.save({k: v.clone() for k, v in hf.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(f'{{"model_type": "dinov3_vit", "num_attention_heads": {HEADS}}}')
    model = dinokit.load(tmp_path)
    x = _x(240, 320)
    _check(model, ref_v3(sd, x), x)


# ------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("family", ["v2", "v2reg", "v3"])
def test_last_selfattention_equals_official_weights(tmp_path: Path, family: str) -> None:
    sd = official_v3(10) if family == "v3" else official_v2(10, registers=4 if family == "v2reg" else 0)
    torch.save(sd, tmp_path / "m.pth")
    model = dinokit.load(tmp_path / "m.pth")
    h, w = (240, 320) if family == "v3" else (238, 322)
    x = _x(h, w, n=1)
    with torch.no_grad():
        if family == "v3":
            ref_v3(sd, x)
        else:
            ref_v2(sd, x, offset=0.0 if family == "v2reg" else 0.1, antialias=family == "v2reg")
        got = dinokit.last_selfattention(model, x)
    ref = _LAST_ATTN[0]
    assert got.shape == ref.shape  # (1, heads, 1 + registers + patches, same)
    assert (got - ref).abs().max() < 1e-5


# ------------------------------------------------------------------------------------ registry / hub cache


def test_dinov3_gated_download_error_says_where_and_how() -> None:
    from dinokit.models.registry import WeightsNotFoundError, get_entry

    e = get_entry("dinov3_vitb16")
    assert e.file_name == "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth" and e.gated
    with pytest.raises(WeightsNotFoundError) as info:
        dinokit.load("dinov3_vitb16")
    msg = str(info.value)
    assert msg.startswith(f"{e.cache_path()}: ") and "\n" not in msg
    assert "gated" in msg and "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/" in msg
    v2 = get_entry("dinov2_vitg14")
    assert v2.url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth"
    assert (v2.knn_top1, v2.linear_top1, v2.pos_embed_resize) == (83.5, 86.5, "offset")
    assert get_entry("dinov2_vitg14_reg").pos_embed_resize == "timm"


@pytest.mark.slow  # full-size ViT-S files (about 90 MB each)
def test_load_registry_names_from_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dinokit.load(name) reads the official file name from $TORCH_HOME/hub/checkpoints (full-size ViT-S)."""
    from dinokit.models.registry import get_entry

    monkeypatch.setenv("DINOKIT_OFFLINE", "1")
    e = get_entry("dinov3_vits16")
    ref = timm.create_model("vit_small_patch16_dinov3_qkvb", num_classes=0, global_pool="token").eval()
    g = _g(11)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if p.ndim == 1 and p.shape[0] == 384 else 0))
    official = {}
    for k, v in ref.state_dict().items():
        if k.endswith("attn.q_bias"):
            kb = k.replace("q_bias", "qkv.bias")
            official[kb] = torch.cat([v, torch.randn(384, generator=g), ref.state_dict()[k.replace("q_", "v_")]])
            official[kb + "_mask"] = torch.cat([torch.ones(384), torch.zeros(384), torch.ones(384)])
        elif k.endswith(("attn.v_bias", "k_bias")) or "rope" in k:
            continue
        else:
            official[k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
                     .replace("reg_token", "storage_tokens").replace("mlp.fc1_g", "mlp.w1")] = v
    official["rope_embed.periods"] = 100.0 ** (2 * torch.arange(16, dtype=torch.float32) / 32)
    official["mask_token"] = torch.zeros(1, 384)
    target = e.cache_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official, target)
    model = dinokit.load("dinov3_vits16")
    assert model.pretrained_cfg["input_size"] == (3, 256, 256) and model.pretrained_cfg["crop_mode"] == "squash"
    x = _x(256, 256, n=1)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() < 1e-4


# ------------------------------------------------------------------------------------ timm hub folders


def _timm_hub_folder(folder: Path, arch: str, sd: dict[str, torch.Tensor], input_size: int) -> Path:
    """A folder as timm publishes on the HF Hub: config.json without model_args, timm-layout weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    cfg = {"architecture": arch, "num_classes": 0, "num_features": D,
           "pretrained_cfg": {"input_size": [3, input_size, input_size], "interpolation": "bicubic",
                              "crop_pct": 1.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    (folder / "config.json").write_text(__import__("json").dumps(cfg))
    return folder


@pytest.mark.parametrize("registers", [0, 4])
def test_timm_hub_dinov2_folder_gets_official_numerics(tmp_path: Path, registers: int) -> None:
    from dinokit.models.dinov2 import dinov2_to_timm

    sd = official_v2(30, registers=registers)
    arch = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    folder = _timm_hub_folder(tmp_path / "t", arch, dinov2_to_timm(sd)[0], 518)
    model = dinokit.load(folder, model_args={"embed_dim": D, "depth": DEPTH, "num_heads": HEADS})
    x = _x(238, 322)
    _check(model, ref_v2(sd, x, offset=0.0 if registers else 0.1, antialias=bool(registers)), x)


def test_timm_hub_dinov3_folder_pools_by_cls(tmp_path: Path) -> None:
    from dinokit.models.dinov3 import dinov3_to_timm

    sd = official_v3(31)
    folder = _timm_hub_folder(tmp_path / "t", "vit_small_patch16_dinov3_qkvb", dinov3_to_timm(sd)[0], 256)
    model = dinokit.load(folder, model_args={"embed_dim": D, "depth": DEPTH, "num_heads": HEADS})
    assert model.global_pool == "token"
    x = _x(240, 320)
    _check(model, ref_v3(sd, x), x)


# ------------------------------------------------------------------------------------ v3 ConvNeXt

CNX_DIMS, CNX_DEPTHS = (16, 32, 48, 64), (1, 2, 1, 1)


def official_convnext(seed: int = 0) -> dict[str, torch.Tensor]:
    """An official DINOv3 ConvNeXt state dict (Facebook ConvNeXt keys; ``norms.3`` repeats ``norm``)."""
    g = _g(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, d in enumerate(CNX_DIMS):
        if i == 0:
            sd.update({"downsample_layers.0.0.weight": _rand(g, d, 3, 4, 4, scale=0.2),
                       "downsample_layers.0.0.bias": _rand(g, d, scale=0.1), **_norm(g, "downsample_layers.0.1", d)})
        else:
            sd.update({**_norm(g, f"downsample_layers.{i}.0", CNX_DIMS[i - 1]),
                       f"downsample_layers.{i}.1.weight": _rand(g, d, CNX_DIMS[i - 1], 2, 2, scale=0.2),
                       f"downsample_layers.{i}.1.bias": _rand(g, d, scale=0.1)})
        for j in range(CNX_DEPTHS[i]):
            b = f"stages.{i}.{j}."
            sd.update({b + "dwconv.weight": _rand(g, d, 1, 7, 7, scale=0.2), b + "dwconv.bias": _rand(g, d, scale=0.1),
                       **_norm(g, b + "norm", d), b + "pwconv1.weight": _rand(g, 4 * d, d, scale=0.2),
                       b + "pwconv1.bias": _rand(g, 4 * d, scale=0.1), b + "pwconv2.weight": _rand(g, d, 4 * d, scale=0.2),
                       b + "pwconv2.bias": _rand(g, d, scale=0.1), b + "gamma": 0.2 + torch.rand(d, generator=g)})
    sd.update(_norm(g, "norm", CNX_DIMS[-1]))
    sd["norms.3.weight"], sd["norms.3.bias"] = sd["norm.weight"], sd["norm.bias"]
    return sd


def ref_convnext(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Official ConvNeXt forward: LayerNorm(global average pool of the last stage) (B, C)."""
    def ln_cf(t: torch.Tensor, name: str) -> torch.Tensor:  # channels-first LayerNorm, eps 1e-6
        u = t.mean(1, keepdim=True)
        s = (t - u).pow(2).mean(1, keepdim=True)
        t = (t - u) / torch.sqrt(s + 1e-6)
        return sd[name + ".weight"][:, None, None] * t + sd[name + ".bias"][:, None, None]

    for i, d in enumerate(CNX_DIMS):
        if i == 0:
            x = ln_cf(F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], stride=4),
                      "downsample_layers.0.1")
        else:
            x = F.conv2d(ln_cf(x, f"downsample_layers.{i}.0"), sd[f"downsample_layers.{i}.1.weight"],
                         sd[f"downsample_layers.{i}.1.bias"], stride=2)
        for j in range(CNX_DEPTHS[i]):
            b = f"stages.{i}.{j}."
            y = F.conv2d(x, sd[b + "dwconv.weight"], sd[b + "dwconv.bias"], padding=3, groups=d).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (d,), sd[b + "norm.weight"], sd[b + "norm.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, sd[b + "pwconv1.weight"], sd[b + "pwconv1.bias"])),
                         sd[b + "pwconv2.weight"], sd[b + "pwconv2.bias"])
            x = x + (sd[b + "gamma"] * y).permute(0, 3, 1, 2)
    return F.layer_norm(x.mean((-2, -1)), (CNX_DIMS[-1],), sd["norm.weight"], sd["norm.bias"], 1e-6)


def test_dinov3_convnext_official_pth_matches_official(tmp_path: Path) -> None:
    sd = official_convnext(40)
    torch.save(sd, tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth")
    model = dinokit.load(tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth")
    for h, w in [(224, 224), (240, 320)]:
        x = _x(h, w)
        with torch.no_grad():
            diff = (model(x) - ref_convnext(sd, x)).abs().max().item()
        assert diff <= 1e-4, diff
    dinokit.save(model, tmp_path / "out")
    x = _x(256, 256)
    with torch.no_grad():
        again = timm.create_model("local-dir:" + str(tmp_path / "out"), pretrained=True).eval()(x)
        assert (again - ref_convnext(sd, x)).abs().max() <= 1e-4


@pytest.mark.slow  # full-size ViT-S files (about 90 MB each)
def test_load_dinov2_reg_registry_name_from_torch_hub_cache() -> None:
    """dinov2_vits14_reg: the official file name in $TORCH_HOME/hub/checkpoints, full-size ViT-S/14."""
    from dinokit.models.registry import get_entry

    torch.manual_seed(12)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=518, num_classes=0, dynamic_img_size=True,
                            init_values=0.5).eval()  # timm's reg4 model computes the official numerics
    pos0 = torch.randn(1, 1, 384)
    official = {k: v for k, v in ref.state_dict().items() if k not in ("cls_token", "pos_embed", "reg_token")}
    official.update(cls_token=ref.cls_token.detach() - pos0, pos_embed=torch.cat([pos0, ref.pos_embed.detach()], 1),
                    register_tokens=ref.reg_token.detach(), mask_token=torch.zeros(1, 384))
    target = get_entry("dinov2_vits14_reg").cache_path()
    assert target.name == "dinov2_vits14_reg4_pretrain.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official, target)
    model = dinokit.load("dinov2_vits14_reg")
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.pretrained_cfg["crop_pct"] == 0.875
    for h, w in [(224, 224), (238, 322)]:
        x = _x(h, w, n=1)
        with torch.no_grad():
            assert (model(x) - ref(x)).abs().max() < 1e-4


def test_hf_dinov3_convnext_folder_matches_official(tmp_path: Path) -> None:
    import re

    from safetensors.torch import save_file

    sd = official_convnext(41)
    hf = {}
    for k, v in sd.items():  # the renames of transformers' DINOv3 ConvNeXt conversion
        if k.startswith("norms."):
            continue
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.layers.\2.", k)
        k = re.sub(r"^downsample_layers\.(\d+)\.(\d+)\.", r"stages.\1.downsample_layers.\2.", k)
        hf[k.replace("dwconv", "depthwise_conv").replace("pwconv", "pointwise_conv").replace("norm", "layer_norm")] = v
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "dinov3_convnext", "hidden_sizes": [16, 32, 48, 64]}')
    model = dinokit.load(tmp_path)
    x = _x(240, 320)
    with torch.no_grad():
        assert (model(x) - ref_convnext(sd, x)).abs().max() <= 1e-4


def test_traceable_offset_resize_equals_interpolate() -> None:
    """The matrix form used for ONNX export equals F.interpolate's offset resize (and the official skip)."""
    from dinokit.models.dinov2 import offset_resize, offset_resize_traceable

    table = torch.randn(1, 16 * 16, 8, generator=_g(60))
    for new in [(17, 23), (12, 9), (16, 16), (16, 20), (40, 3)]:
        a = offset_resize(table, (16, 16), new)
        b = offset_resize_traceable(table, (16, 16), new)
        assert a.shape == b.shape == (1, new[0] * new[1], 8)
        assert (a - b).abs().max() < 1e-5
    assert torch.equal(offset_resize(table, (16, 16), (16, 16)), table)
