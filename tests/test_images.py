"""Image discovery, robust RGB decoding, skipping datasets and the official eval transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data.images import (
    ImageDataset,
    ImageError,
    collate_skipping,
    labeled_folder,
    list_images,
    load_rgb,
)
from dinokit.data.transforms import eval_transform, preprocessing_config

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _rgb_array(seed: int = 0, h: int = 20, w: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_bad_files(root: Path) -> dict[str, str]:
    """Each kind of unusable file, and a word its error reason must contain."""
    root.mkdir(parents=True, exist_ok=True)
    good = root / "_src.jpg"
    Image.fromarray(_rgb_array(1, 64, 64)).save(good, quality=90)
    data = good.read_bytes()
    good.unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    rng = np.random.default_rng(3)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    return {"truncated.jpg": "truncated", "empty.png": "empty", "notes.jpg": "not an image",
            "corrupt.png": "not an image"}


def test_list_images_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    for rel in ["b/2.PNG", "b/10.jpg", "a.jpeg", "c/d/e.webp", "readme.txt", ".hidden/x.jpg", "b/.y.png"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rel == ["a.jpeg", "b/10.jpg", "b/2.PNG", "c/d/e.webp"]
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "RGB"])
def test_load_rgb_converts_every_mode(tmp_path: Path, mode: str) -> None:
    rgb = _rgb_array()
    gray = rgb[..., 0]
    if mode == "L":
        img, expect = Image.fromarray(gray), np.stack([gray] * 3, -1)
    elif mode == "LA":
        img = Image.fromarray(np.stack([gray, np.full_like(gray, 7)], -1), mode="LA")
        expect = np.stack([gray] * 3, -1)
    elif mode == "RGBA":
        img = Image.fromarray(np.concatenate([rgb, np.zeros_like(gray)[..., None]], -1), mode="RGBA")
        expect = rgb  # alpha dropped, colour kept (torchvision's loader does the same)
    elif mode == "P":
        palette = np.random.default_rng(5).integers(0, 256, (256, 3), dtype=np.uint8)
        img = Image.fromarray(gray, mode="L").convert("P")
        img.putpalette(palette.reshape(-1).tolist())
        expect = palette[np.asarray(img)]
    elif mode == "CMYK":
        cmyk = np.concatenate([255 - rgb, np.zeros_like(gray)[..., None]], -1)
        img, expect = Image.fromarray(cmyk, mode="CMYK"), rgb  # K = 0: RGB = 255 - CMY
    elif mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)  # full 16-bit range
        expect = np.stack([gray] * 3, -1)
    elif mode == "1":
        bits = gray > 127
        img = Image.fromarray(bits)
        expect = np.stack([bits.astype(np.uint8) * 255] * 3, -1)
    else:
        img, expect = Image.fromarray(rgb), rgb
    ext = "tiff" if mode == "CMYK" else "png"
    path = tmp_path / f"img.{ext}"
    img.save(path)
    assert Image.open(path).mode == mode
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(out), expect)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high with a red block top-left; orientation 6 = "rotate 90 CW to display".
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:8, :8] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=100)
    out = np.asarray(load_rgb(path))
    assert out.shape == (40, 20, 3)  # displayed portrait
    # after a clockwise quarter turn the top-left corner is at the top-right
    assert out[2, 17, 0] > 200 and out[2, 17, 1] < 60
    assert out[2, 2, 0] < 60


def test_bad_files_raise_one_line_image_errors(tmp_path: Path) -> None:
    expected = write_bad_files(tmp_path)
    for name, word in expected.items():
        with pytest.raises(ImageError) as info:
            load_rgb(tmp_path / name)
        msg = str(info.value)
        assert msg.startswith(f"{tmp_path / name}: ") and "\n" not in msg
        assert word in info.value.reason
        assert isinstance(info.value, ValueError)
    with pytest.raises(ImageError, match="cannot read"):
        load_rgb(tmp_path / "nope.jpg")


@pytest.mark.parametrize("workers", [0, 1])
def test_dataset_skips_and_reports_bad_files(tmp_path: Path, workers: int) -> None:
    bad = write_bad_files(tmp_path)
    for i in range(3):
        Image.fromarray(_rgb_array(10 + i, 40, 40)).save(tmp_path / f"good{i}.png")
    paths = list_images(tmp_path)
    ds = ImageDataset(paths, eval_transform(None, image_size=32))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate_skipping)
    seen, skipped = [], []
    for batch in loader:
        if batch.images is not None:
            assert batch.images.shape[1:] == (3, 32, 32)
            assert batch.images.shape[0] == len(batch.indices)
        seen += batch.indices.tolist()
        skipped += batch.skipped
    assert sorted(Path(paths[i]).name for i in seen) == ["good0.png", "good1.png", "good2.png"]
    assert {Path(s.path).name for s in skipped} == set(bad)
    assert all(Path(paths[s.index]) == Path(s.path) for s in skipped)


def test_labeled_folder(tmp_path: Path) -> None:
    for cls, n in [("dog", 2), ("cat", 3), ("emu", 0)]:
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(_rgb_array(i, 8, 8)).save(tmp_path / cls / f"{i}.png")
    Image.fromarray(_rgb_array(0, 8, 8)).save(tmp_path / "stray.png")
    paths, labels, classes = labeled_folder(tmp_path)
    assert classes == ["cat", "dog", "emu"]
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 1, 1]
    assert [p.parent.name for p in paths] == ["cat"] * 3 + ["dog"] * 2
    with pytest.raises(ValueError, match="no class subfolders"):
        labeled_folder(tmp_path / "cat")


def test_eval_transform_is_official_resize_256_crop_224() -> None:
    p = preprocessing_config(None)
    assert (p["resize_size"], p["crop_size"], p["interpolation"]) == (256, 224, "bicubic")
    # A 256x300 image: the short side is already 256, so the output must be exactly the
    # centre 224x224 window of the raw pixels, normalized with ImageNet statistics.
    arr = np.random.default_rng(0).integers(0, 256, (256, 300, 3), dtype=np.uint8)
    x = eval_transform(None)(Image.fromarray(arr)).numpy()
    top, left = (256 - 224) // 2, (300 - 224) // 2
    ref = (arr[top:top + 224, left:left + 224] / 255.0 - MEAN) / STD
    np.testing.assert_allclose(x, ref.transpose(2, 0, 1), atol=1e-5)


def test_eval_transform_sizes_follow_model_cfg(tiny_vit: torch.nn.Module) -> None:
    cfg = {"input_size": (3, 96, 96), "crop_pct": 0.875, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    p = preprocessing_config(cfg)
    assert (p["resize_size"], p["crop_size"]) == (109, 96)  # floor(96 / 0.875)
    assert preprocessing_config(cfg, image_size=224)["resize_size"] == 256
    # grayscale -> 3 channels, each normalized with its own mean/std: a constant grey v
    img = Image.fromarray(np.full((50, 70), 200, dtype=np.uint8), mode="L")
    x = eval_transform(cfg)(img)
    assert x.shape == (3, 96, 96)
    torch.testing.assert_close(x, torch.full((3, 96, 96), (200 / 255 - 0.5) / 0.5))
    # a model's pretrained_cfg is used when a model is given
    y = eval_transform(tiny_vit, image_size=40)(img)
    assert y.shape == (3, 40, 40)
