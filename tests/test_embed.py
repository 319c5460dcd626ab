"""dinokit.embed: inputs of every kind, feature kinds checked by hand, feature files, bad files."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vit
from PIL import Image
from test_images import write_bad_files

from dinokit.data.images import ImageError, Skipped, load_rgb
from dinokit.data.transforms import eval_transform, normalize_pixels, pixel_transform, preprocessing_config
from dinokit.embedding import Embeddings, compute_features, embed, load_embeddings


def _write_mode_images(root: Path) -> list[str]:
    """One good image per Pillow mode, in nested folders; returns their relative names (sorted)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    gray = rgb[..., 1]
    imgs = {
        "rgb/a.jpg": Image.fromarray(rgb),
        "gray/l.png": Image.fromarray(gray),
        "gray/la.png": Image.fromarray(np.stack([gray, gray], -1), mode="LA"),
        "p.png": Image.fromarray(gray).convert("P"),
        "rgba.png": Image.fromarray(np.concatenate([rgb, gray[..., None]], -1), mode="RGBA"),
        "cmyk.tiff": Image.fromarray(rgb).convert("CMYK"),
        "deep/er/i16.png": Image.fromarray(gray.astype(np.uint16) * 257),
    }
    for rel, img in imgs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel)
    return sorted(imgs)


def _manual(model: torch.nn.Module, paths: list[Path], size: int) -> torch.Tensor:
    t = eval_transform(model, image_size=size)
    with torch.no_grad():
        return model(torch.stack([t(load_rgb(p)) for p in paths]))


# 0: decoded in the main thread, 1: a worker process, None: on the CPU a thread pool between forwards
@pytest.mark.parametrize("workers", [0, 1, None])
def test_embed_folder_skips_bad_files(tmp_path: Path, tiny_vit: torch.nn.Module, workers: int | None) -> None:
    good = _write_mode_images(tmp_path)
    bad = write_bad_files(tmp_path / "bad")
    calls: list[tuple[int, int]] = []
    emb = embed(tiny_vit, tmp_path, batch_size=3, num_workers=workers, image_size=32,
                progress=lambda d, t: calls.append((d, t)))
    assert emb.paths == good  # relative, sorted, bad files removed
    assert sorted(p for p, _ in emb.skipped) == sorted(f"bad/{n}" for n in bad)
    reasons = dict(emb.skipped)
    for name, word in bad.items():
        assert word in reasons[f"bad/{name}"]
    ref = _manual(tiny_vit, [tmp_path / p for p in good], 32)
    assert emb.features.dtype == torch.float32 and emb.features.shape == (len(good), 48)
    torch.testing.assert_close(emb.features, ref, atol=1e-5, rtol=1e-5)
    assert calls[-1] == (len(good) + len(bad), len(good) + len(bad))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(ImageError, match=r"bad/\w+\.\w+: "):
        embed(tiny_vit, tmp_path, batch_size=4, num_workers=0, image_size=32, strict=True)


def test_embed_arrays_tensors_and_paths(tiny_vit: torch.nn.Module, tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    t = eval_transform(tiny_vit, image_size=32)
    with torch.no_grad():
        ref = tiny_vit(torch.stack([t(Image.fromarray(a)) for a in arr]))
    e1 = embed(tiny_vit, arr, batch_size=2, num_workers=0, image_size=32)
    assert e1.paths == ["0", "1", "2", "3", "4"] and e1.skipped == []
    torch.testing.assert_close(e1.features, ref, atol=1e-5, rtol=1e-5)
    e2 = embed(tiny_vit, torch.from_numpy(arr), batch_size=4, num_workers=1, image_size=32)
    torch.testing.assert_close(e2.features, ref, atol=1e-5, rtol=1e-5)
    e2b = embed(tiny_vit, arr, batch_size=2, image_size=32, device="cpu")  # uint8 pixels normalized per batch
    torch.testing.assert_close(e2b.features, ref, atol=1e-5, rtol=1e-5)
    # RGB arrays, and float tensors taken as ready model input
    rgb = np.random.default_rng(2).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    x = torch.stack([t(Image.fromarray(a)) for a in rgb])
    e3 = embed(tiny_vit, rgb, num_workers=0, image_size=32)
    e4 = embed(tiny_vit, x, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(e3.features, tiny_vit(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e4.features, tiny_vit(x), atol=1e-5, rtol=1e-5)
    # a list of paths keeps the given order and names
    for i, a in enumerate(rgb):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    paths = [tmp_path / "2.png", tmp_path / "0.png"]
    e5 = embed(tiny_vit, paths, num_workers=0, image_size=32)
    assert e5.paths == [str(p) for p in paths]
    torch.testing.assert_close(e5.features, e3.features[[2, 0]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dtype"):
        embed(tiny_vit, arr.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="missing"):
        embed(tiny_vit, tmp_path / "missing")


def _tokens_by_hand(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Token sequences after each block, computed step by step (independent of timm's helpers)."""
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    h = model.norm_pre(h)
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(h)
    return outs


def test_feature_kinds_match_official_definitions() -> None:
    model = make_tiny_vit(depth=5)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = _tokens_by_hand(model, x)
        last = model.norm(outs[-1])
        cls = compute_features(model, x, "cls")
        torch.testing.assert_close(cls, last[:, 0], atol=1e-5, rtol=1e-5)
        avg = compute_features(model, x, "cls+avgpool")
        torch.testing.assert_close(avg, torch.cat([last[:, 0], last[:, 1:].mean(1)], -1), atol=1e-5, rtol=1e-5)
        last4 = compute_features(model, x, "last4")
        ref4 = torch.cat([model.norm(o)[:, 0] for o in outs[-4:]], -1)
        assert last4.shape == (3, 4 * 48)
        torch.testing.assert_close(last4, ref4, atol=1e-5, rtol=1e-5)
        patch = compute_features(model, x, "patch")
        assert patch.shape == (3, 16, 48)
        torch.testing.assert_close(patch, last[:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="only 5 blocks"):
        compute_features(model, x, "last6")
    with pytest.raises(ValueError, match="expected one of"):
        embed(model, x, features="avg")
    e = embed(model, x, features="patch")
    assert e.features.shape == (3, 16, 48)


@pytest.mark.parametrize("suffix", [".npz", ".npy", ".safetensors"])
def test_embeddings_save_load_roundtrip(tmp_path: Path, suffix: str) -> None:
    feats = torch.randn(4, 6)
    e = Embeddings(feats, ["a/1.jpg", "b/2.jpg", "c.png", "ü.png"], [("x.jpg", "empty file")],
                   {"model": "m", "fingerprint": "abc"})
    out = e.save(tmp_path / "sub" / f"f{suffix}")
    assert [p.name for p in out.parent.iterdir()] == [f"f{suffix}"]  # no temp file left
    back = load_embeddings(out)
    torch.testing.assert_close(back.features, feats)
    if suffix == ".npy":
        assert back.paths == ["0", "1", "2", "3"]
        np.testing.assert_array_equal(np.load(out), feats.numpy())
    else:
        assert back.paths == e.paths and back.info == e.info
    if suffix == ".npz":  # the documented layout: arrays features and paths
        z = np.load(out)
        assert z["features"].dtype == np.float32 and list(z["paths"]) == e.paths
    with pytest.raises(ValueError, match="unknown feature file type"):
        e.save(tmp_path / "f.csv")


def test_cli_embed_reports_skipped_files(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import dinokit
    from dinokit.cli import app

    model = make_tiny_vit(seed=3)
    model_dir = dinokit.save(model, tmp_path / "model")
    images = tmp_path / "images"
    good = _write_mode_images(images)
    bad = write_bad_files(images / "bad")
    runner = CliRunner()
    out = tmp_path / "feats.npz"
    args = ["embed", str(images), "--model", str(model_dir), "--out", str(out), "--image-size", "32",
            "--batch-size", "4", "--workers", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    z = np.load(out)
    assert list(z["paths"]) == good and z["features"].shape == (len(good), 48)
    ref = _manual(model, [images / p for p in good], 32)
    np.testing.assert_allclose(z["features"], ref.numpy(), atol=1e-5, rtol=1e-5)
    assert f"skipped {len(bad)} unreadable files" in res.output
    for name, word in bad.items():
        assert f"bad/{name}: " in res.output and word in res.output
    # other formats and feature kinds, by suffix
    res = runner.invoke(app, [*args[:5], str(tmp_path / "f.safetensors"), *args[6:], "--features", "cls+avgpool"])
    assert res.exit_code == 0, res.output
    assert load_embeddings(tmp_path / "f.safetensors").features.shape == (len(good), 96)
    res = runner.invoke(app, [*args, "--strict"])
    assert res.exit_code == 1 and "error:" in res.output and "bad/" in res.output
    res = runner.invoke(app, ["embed", str(images), "--model", "nope/missing", "--out", str(out)])
    assert res.exit_code == 1 and "nope/missing" in res.output


def test_embed_restores_training_mode() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=3, proj_drop_rate=0.5, drop_path_rate=0.5)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    e = embed(model, x)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(e.features, model(x))  # and it ran in eval mode (dropout off)


def test_embed_honours_exif_orientation(tmp_path: Path, tiny_vit: torch.nn.Module) -> None:
    arr = np.random.default_rng(4).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "a_tagged.png", exif=exif.tobytes())
    Image.fromarray(np.ascontiguousarray(np.rot90(arr, k=-1))).save(tmp_path / "b_upright.png")
    Image.fromarray(arr).save(tmp_path / "c_untagged.png")
    e = embed(tiny_vit, tmp_path, num_workers=0, image_size=32)
    assert e.paths == ["a_tagged.png", "b_upright.png", "c_untagged.png"]
    torch.testing.assert_close(e.features[0], e.features[1], atol=1e-6, rtol=0)
    assert (e.features[0] - e.features[2]).abs().max() > 1e-3  # the rotation did change the features


def test_squash_crop_mode_resizes_both_sides_as_dinov3() -> None:
    """DINOv3's official eval resizes the whole image to S x S (no aspect-keeping crop)."""
    from torchvision.transforms import functional as TF

    img = Image.fromarray(np.arange(40 * 100 * 3, dtype=np.uint8).reshape(40, 100, 3) % 251)
    cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear"}
    got = eval_transform(cfg)(img)
    assert got.shape == (3, 32, 32)
    # whole image kept: columns at both horizontal ends come from the image's ends, not a center crop
    ref = TF.normalize(TF.to_tensor(TF.resize(img, [32, 32], antialias=True)), [0.485, 0.456, 0.406],
                       [0.229, 0.224, 0.225])
    assert torch.allclose(got, ref, atol=1e-6)
    center = eval_transform({**cfg, "crop_mode": "center"})(img)
    assert not torch.allclose(got, center, atol=1e-2)


def test_normalize_pixels_equals_to_tensor_and_normalize() -> None:
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (33, 30), dtype=np.uint8))]  # grayscale: 3 equal channels
    p = preprocessing_config({"mean": (0.5, 0.25, 0.1), "std": (0.2, 0.3, 0.4)}, 32)
    pixels = torch.stack([pixel_transform(p)(im) for im in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 32, 32)
    x = normalize_pixels(pixels, p["mean"], p["std"])
    ref = torch.stack([eval_transform({"mean": (0.5, 0.25, 0.1), "std": (0.2, 0.3, 0.4)}, 32)(im) for im in images])
    assert x.is_contiguous() and x.dtype == torch.float32
    torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)
    assert x[0, 2].min() < -0.2 and x[1, 0].max() > 2.4  # the per-channel constants really differ
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(pixels.float(), p["mean"], p["std"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_decode_ahead_keeps_order_and_runs_at_background_priority() -> None:
    from dinokit.embedding import _decode_ahead

    seen: list[tuple[int, int]] = []

    class Pixels(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 7

        def __getitem__(self, i: int) -> object:
            seen.append((i, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
            if i == 4:
                return Skipped(i, "4.jpg", "truncated")
            return torch.full((3, 2, 2), 10 * i, dtype=torch.uint8), i

    pre = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    out = list(_decode_ahead(Pixels(), pre, [[0, 1, 2], [3, 4, 5], [6]]))
    assert [idx for _, idx, _ in out] == [[0, 1, 2], [3, 5], [6]]
    assert [len(bad) for _, _, bad in out] == [0, 1, 0] and out[1][2][0].path == "4.jpg"
    x = out[1][0]
    assert x is not None and x.dtype == torch.float32 and x[:, 0, 0, 0].tolist() == pytest.approx([30 / 255, 50 / 255])
    assert sorted(i for i, _ in seen) == list(range(7))
    assert {nice for _, nice in seen} == {19}  # decoding never competes with the model's threads
