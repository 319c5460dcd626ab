"""Multi-crop: official probabilities, crop geometry, each batched op against torchvision/PIL references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from dinokit.data.multicrop import (
    MultiCropSpec,
    PILMultiCrop,
    TensorMultiCrop,
    _gaussian_blur,
    sample_crop_boxes,
    sample_view_params,
)

OFF = dict(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0, 0.0), solarize_prob=0.0)
UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _images(n: int = 6, c: int = 3, size: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


def test_official_probabilities_and_ranges() -> None:
    spec = MultiCropSpec()
    views = spec.views
    assert len(views) == 10 and [v.size for v in views] == [224, 224] + [96] * 8
    assert [v.blur_prob for v in views[:3]] == [1.0, 0.1, 0.5] and [v.solarize_prob for v in views[:3]] == [0, 0.2, 0]
    g = torch.Generator().manual_seed(0)
    n = 20000
    stats = {}
    for name, view in (("g1", views[0]), ("g2", views[1]), ("loc", views[2])):
        p = sample_view_params(spec, view, n, 300, 400, g)
        stats[name] = p
        assert p.flip.float().mean().item() == pytest.approx(0.5, abs=0.015)
        assert p.jitter.float().mean().item() == pytest.approx(0.8, abs=0.015)
        assert p.gray.float().mean().item() == pytest.approx(0.2, abs=0.015)
        assert p.factors[:, 0].min() >= 0.6 and p.factors[:, 0].max() <= 1.4
        assert p.factors[:, 2].min() >= 0.8 and p.factors[:, 2].max() <= 1.2
        assert p.factors[:, 3].abs().max() <= 0.1 and p.factors[:, 3].std() == pytest.approx(0.2 / math.sqrt(12), rel=0.05)
        assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    assert stats["g1"].blur.all() and stats["g1"].solarize.sum() == 0
    assert stats["g2"].blur.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert stats["g2"].solarize.float().mean().item() == pytest.approx(0.2, abs=0.015)
    assert stats["loc"].blur.float().mean().item() == pytest.approx(0.5, abs=0.015)


def test_crop_boxes_follow_random_resized_crop() -> None:
    g = torch.Generator().manual_seed(0)
    h_img, w_img = 60, 80
    boxes = sample_crop_boxes(5000, h_img, w_img, (0.05, 0.4), g)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= h_img).all() and (left + w <= w_img).all()
    frac = (h * w).double() / (h_img * w_img)
    assert frac.min() > 0.04 and frac.max() < 0.42  # scale range up to rounding
    ratio = w.double() / h.double()
    assert ratio.min() > 0.7 and ratio.max() < 1.43
    # area fraction is uniform on the scale range (no rejections at these sizes)
    assert frac.mean().item() == pytest.approx(0.225, abs=0.01)
    # scale 1 on a square image never fits a non-square aspect -> torchvision's fallback: the whole image
    full = sample_crop_boxes(50, 28, 28, (1.0, 1.0), g)
    assert (full == torch.tensor([0, 0, 28, 28])).all()


def test_identity_settings_reproduce_the_input() -> None:
    x = _images(4, 3, 20)
    spec = MultiCropSpec(global_crops_size=20, local_crops_size=20, global_crops_scale=(1.0, 1.0),
                         local_crops_scale=(1.0, 1.0), local_crops_number=1, **OFF, **UNIT)
    crops = TensorMultiCrop(spec)(x, torch.Generator().manual_seed(0))
    assert len(crops) == 3
    for c in crops:
        assert torch.allclose(c, x.float() / 255, atol=1e-6)
    pil = PILMultiCrop(spec)(Image.fromarray(x[0].permute(1, 2, 0).numpy()), torch.Generator().manual_seed(0))
    assert torch.allclose(pil[0], x[0].float() / 255, atol=1e-6)


def test_flip_solarize_grayscale_match_references() -> None:
    x = _images(5, 3, 16)
    spec = MultiCropSpec(global_crops_size=16, global_crops_scale=(1.0, 1.0), local_crops_number=0,
                         **{**OFF, "flip_prob": 1.0, "solarize_prob": 1.0, "grayscale_prob": 1.0}, **UNIT)
    g1, g2 = TensorMultiCrop(spec)(x, torch.Generator().manual_seed(0))
    for i in range(5):
        img = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        ref = TF.rgb_to_grayscale(TF.pil_to_tensor(ImageOps.mirror(img)).float() / 255, num_output_channels=3)
        assert torch.allclose(g1[i], ref, atol=1e-6)  # view 1: flip + gray, never solarized
        sol = torch.where(ref >= 128 / 255, 1 - ref, ref)  # view 2 also solarized (PIL threshold 128)
        assert torch.allclose(g2[i], sol, atol=1e-6)
    # PIL solarize on uint8 agrees with the float rule
    u8 = x[0, 0].numpy()
    pil_sol = np.asarray(ImageOps.solarize(Image.fromarray(u8), threshold=128)).astype(np.float32) / 255
    f = torch.from_numpy(u8).float() / 255
    assert np.allclose(torch.where(f >= 128 / 255, 1 - f, f).numpy(), pil_sol, atol=1e-6)


def test_color_jitter_matches_torchvision_ops_in_the_drawn_order() -> None:
    x = _images(8, 3, 12, seed=3).float() / 255
    spec = MultiCropSpec(global_crops_size=12, global_crops_scale=(1.0, 1.0), local_crops_number=0,
                         **{**OFF, "color_jitter_prob": 1.0}, **UNIT)
    tm = TensorMultiCrop(spec)
    p = sample_view_params(spec, spec.views[0], 8, 12, 12, torch.Generator().manual_seed(5))
    got = tm._color_jitter(x.clone(), p)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(8):
        ref = x[i]
        for op in p.order.tolist():
            ref = ops[op](ref, float(p.factors[i, op]))
        assert torch.allclose(got[i], ref, atol=2e-5), i


def test_gaussian_blur_matches_torchvision_away_from_edges() -> None:
    y = torch.rand(3, 2, 24, 24)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    got = _gaussian_blur(y, sigma)
    r = 6  # ceil(3 * max sigma)
    for i in range(3):
        ref = TF.gaussian_blur(y[i], kernel_size=[2 * r + 1, 2 * r + 1], sigma=[float(sigma[i])] * 2)
        assert torch.allclose(got[i, :, r:-r, r:-r], ref[:, r:-r, r:-r], atol=1e-5)
    # replicated edges: a constant image stays constant, mass is preserved
    const = torch.full((1, 1, 10, 10), 0.3)
    assert torch.allclose(_gaussian_blur(const, torch.tensor([2.0])), const, atol=1e-6)


def test_sharded_params_equal_the_global_batch() -> None:
    x = _images(8, 1, 28)
    spec = MultiCropSpec(global_crops_size=32, local_crops_size=16, local_crops_number=2)
    tm = TensorMultiCrop(spec)
    full = tm(x, torch.Generator().manual_seed(7))
    half = tm(x[4:], torch.Generator().manual_seed(7), total=8, offset=4)
    for a, b in zip(full, half, strict=True):
        assert torch.allclose(a[4:], b, atol=1e-5)


def test_grayscale_input_is_exact_and_three_channel() -> None:
    """A 1-channel batch gives the same crops as the same images repeated to RGB (up to torchvision's
    luma weights summing to 0.9999, which the RGB path applies in contrast and grayscale)."""
    x = _images(6, 1, 28, seed=2)
    spec = MultiCropSpec(global_crops_size=32, local_crops_size=16, local_crops_number=2)
    tm = TensorMultiCrop(spec)
    gray = tm(x, torch.Generator().manual_seed(1))
    rgb = tm(x.expand(-1, 3, -1, -1), torch.Generator().manual_seed(1))
    assert [tuple(c.shape) for c in gray] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 2
    for a, b in zip(gray, rgb, strict=True):
        assert torch.allclose(a, b, atol=2e-3)


def test_pil_pipeline_shapes_and_determinism() -> None:
    img = Image.fromarray(np.arange(40 * 50, dtype=np.uint8).reshape(40, 50) % 251, mode="L")
    spec = MultiCropSpec(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    a = PILMultiCrop(spec)(img, torch.Generator().manual_seed(0))
    b = PILMultiCrop(spec)(img, torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in a] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))
