"""Attention maps against a hand computation from the last block's own weights."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import dinokit
from dinokit.attention import NoAttentionError, attention_maps, frames_gif, save_attention, threshold_masks


def _vit(patch: int, reg_tokens: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True, img_size=32,
        patch_size=patch, depth=2, embed_dim=48, num_heads=3, reg_tokens=reg_tokens,
    )
    # timm's init (std 0.02) gives almost uniform attention; larger q/k weights give peaked
    # attention, so a wrong scale or a missing normalization changes the result measurably
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(15.0)
    return model.eval()


def _by_hand(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens through every block but the last, then softmax(q k^T / sqrt(d)) from its norm1 and qkv Linear."""
    t = model.patch_embed(x)
    t = model._pos_embed(t)
    t = model.norm_pre(t)
    for blk in model.blocks[:-1]:
        t = blk(t)
    last = model.blocks[-1]
    y = last.norm1(t)
    W, b = last.attn.qkv.weight, last.attn.qkv.bias
    qkv = y @ W.T + b  # (B, N, 3*C)
    B, N, C3 = qkv.shape
    C = C3 // 3
    heads = 3
    d = C // heads
    q = qkv[..., :C].reshape(B, N, heads, d).transpose(1, 2)
    k = qkv[..., C:2 * C].reshape(B, N, heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)


@pytest.mark.parametrize(("patch", "hw"), [(8, (40, 56)), (16, (48, 80))])
def test_last_selfattention_matches_hand_computation(patch: int, hw: tuple[int, int]) -> None:
    model = _vit(patch)
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        attn = dinokit.last_selfattention(model, x)
        ref = _by_hand(model, x)
    n = 1 + (hw[0] // patch) * (hw[1] // patch)
    assert attn.shape == (2, 3, n, n)
    torch.testing.assert_close(attn, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, n), rtol=0, atol=1e-5)
    # not a uniform or identity matrix: the test would catch a wrong scale or a missing softmax
    assert attn.max() > 0.3


def test_register_tokens_are_prefix_tokens() -> None:
    model = _vit(8, reg_tokens=4)
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        attn = dinokit.last_selfattention(model, x)
        ref = _by_hand(model, x)
    assert attn.shape == (1, 3, 5 + 15, 5 + 15)
    torch.testing.assert_close(attn, ref, rtol=1e-5, atol=1e-6)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    maps = attention_maps(model, img, image_size=(24, 40), threshold=0.6)
    # the CLS row over patches only (the 4 registers skipped)
    with torch.no_grad():
        x2, _ = dinokit.attention.prepare_image(model, img, (24, 40))
        full = dinokit.last_selfattention(model, x2)[0, :, 0, 5:].reshape(3, 3, 5)
    np.testing.assert_allclose(maps.patch_maps, full.numpy(), rtol=1e-5, atol=1e-7)


def test_fused_attention_kept_and_hook_removed() -> None:
    model = _vit(8)
    x = torch.randn(1, 3, 32, 32)
    calls = {"n": 0}
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    with torch.no_grad():
        before = model(x)
        dinokit.last_selfattention(model, x)
        with mock.patch.object(F, "scaled_dot_product_attention", counting):
            after = model(x)
    assert all(blk.attn.fused_attn for blk in model.blocks)
    assert calls["n"] == len(model.blocks)  # every block still went through SDPA
    assert not model.blocks[-1].attn._forward_pre_hooks
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_threshold_masks_keep_the_official_mass() -> None:
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.random((4, 50)).astype(np.float32) ** 3)
    masks = threshold_masks(a, 0.6)
    for row, m in zip(a.numpy(), masks.numpy(), strict=True):
        p = row / row.sum()
        kept = np.sort(p[m])
        # the kept patches hold more than 60% of the mass, and they are the largest ones
        assert kept.sum() > 0.6 - 1e-6
        assert kept.min() >= p[~m].max()
        # minimal: dropping the smallest kept patch leaves less than 60%
        assert kept[1:].sum() <= 0.6 + 1e-6


def test_attention_maps_at_image_resolution() -> None:
    model = _vit(8)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    maps = attention_maps(model, img, image_size=36, threshold=0.6)
    # short side 50 -> 36, long side 70 -> 50; cropped to multiples of 8: 32 x 48
    assert maps.image.size == (48, 32)
    assert maps.heads.shape == (3, 32, 48) and maps.masks.shape == (3, 32, 48)
    assert maps.patch_maps.shape == (3, 4, 6)
    # nearest upsampling: every 8x8 block repeats its patch value
    np.testing.assert_array_equal(maps.heads, np.kron(maps.patch_maps, np.ones((8, 8), np.float32)))
    np.testing.assert_allclose(maps.mean, maps.heads.mean(0), rtol=1e-6)
    # CLS-to-patch rows hold (almost) all of the CLS row's mass minus its self-attention
    assert np.all(maps.patch_maps.sum(axis=(1, 2)) <= 1 + 1e-5)
    want = threshold_masks(torch.from_numpy(maps.patch_maps.reshape(3, -1)), 0.6).numpy().reshape(3, 4, 6)
    np.testing.assert_array_equal(maps.masks[:, ::8, ::8], want)


def test_resnet_gets_a_clear_error() -> None:
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    with pytest.raises(NoAttentionError, match="no transformer blocks with self-attention"):
        dinokit.last_selfattention(resnet, torch.randn(1, 3, 32, 32))
    with pytest.raises(NoAttentionError):
        attention_maps(resnet, Image.new("RGB", (32, 32)))


def test_save_attention_and_gif(tmp_path) -> None:
    model = _vit(8)
    rng = np.random.default_rng(2)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(frames / f"{i:03d}.png")
    maps = attention_maps(model, frames / "000.png", image_size=40)
    written = save_attention(maps, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == sorted(["img.png", "attn-mean.png", "overlay.png",
                            *[f"attn-head{j}.png" for j in range(3)],
                            *[f"mask_th0.6_head{j}.png" for j in range(3)],
                            *[f"overlay-head{j}.png" for j in range(3)]])
    with Image.open(tmp_path / "out" / "attn-head0.png") as im:
        assert im.size == (48, 40)
    gif = frames_gif(model, frames, tmp_path / "video.gif", image_size=40)
    with Image.open(gif) as im:
        assert im.n_frames == 3 and im.size == (48, 40)


def test_fixed_size_vit_gets_a_clear_error() -> None:
    torch.manual_seed(0)
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              depth=2, embed_dim=48, num_heads=3).eval()
    with pytest.raises(ValueError, match=r"cannot take \(40, 48\) inputs .*dynamic_img_size=True"):
        dinokit.last_selfattention(fixed, torch.randn(1, 3, 40, 48))
    assert not fixed.blocks[-1].attn._forward_pre_hooks  # the hook is gone after an error too


def test_attention_maps_repr_is_short() -> None:
    import numpy as np
    from PIL import Image

    from dinokit.attention import AttentionMaps

    maps = AttentionMaps(Image.new("RGB", (64, 32)), np.zeros((6, 32, 64), np.float32), np.zeros((32, 64), np.float32),
                         None, np.zeros((6, 4, 8), np.float32), 0.6, 8)
    assert repr(maps) == "AttentionMaps(6 heads, 64x32 px, patch 8, masks at 0.6 of the mass)"
