"""Image discovery, robust RGB decoding, skipping datasets and the official eval transform."""

from __future__ import annotations

import os
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


# ---------------------------------------------------------------- hostile folders (issue 16)
def _png(path: Path, seed: int = 0, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb_array(seed, size, size)).save(path)


def _bomb_png(path: Path, w: int = 40000, h: int = 40000) -> None:
    """A 100-byte PNG whose header claims w x h pixels (the data is not there: decoding would fail)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _loop_folder(root: Path) -> list[str]:
    names = ["a.png", "b.png", "c.png", "sub/d.png", "sub/e.png", "sub/deep/f.png", "g/h.png", "g/i.png", "j.png"]
    for i, rel in enumerate(names):
        _png(root / rel, i)
    (root / "sub" / "loop").symlink_to("..")  # sub/loop -> root: a cycle
    (root / "g" / "again").symlink_to("../sub")  # a second way into sub
    return sorted(names)


def test_walk_visits_each_real_folder_once_despite_link_loops(tmp_path: Path) -> None:
    from dinokit.data.images import scan_images

    names = _loop_folder(tmp_path)
    scan = scan_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in scan.paths] == names  # 9 rows, not 369
    assert scan.skipped == []


def test_loop_guard_mutation_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the (device, inode) guard removed the same walk repeats images: the test above fails."""
    from dinokit.data import images

    for i, rel in enumerate(["a.png", "b.png", "sub/c.png"]):
        _png(tmp_path / rel, i)
    (tmp_path / "sub" / "loop").symlink_to("..")  # one loop only: the unguarded walk is linear, ~40 deep
    assert len(images.scan_images(tmp_path).paths) == 3
    monkeypatch.setattr(images, "_first_visit", lambda seen, st: True)
    assert len(images.scan_images(tmp_path).paths) > 30 * 3


def test_links_outside_the_root_are_named_not_followed(tmp_path: Path) -> None:
    from dinokit.data.images import scan_images

    root, outside = tmp_path / "root", tmp_path / "outside"
    _png(root / "in.png")
    _png(outside / "o1.png", 1)
    _png(outside / "deep" / "o2.png", 2)
    (root / "ext").symlink_to(outside)
    (root / "one.png").symlink_to(outside / "o1.png")
    (root / "inner.png").symlink_to("in.png")  # inside the root: followed
    (root / "dangling.png").symlink_to(tmp_path / "nothing.png")
    scan = scan_images(root)
    assert [p.name for p in scan.paths] == ["in.png", "inner.png"]
    reasons = {Path(p).name: r for p, r in scan.skipped}
    assert set(reasons) == {"ext", "one.png", "dangling.png"}
    assert reasons["ext"].startswith("link outside the folder") and reasons["dangling.png"] == "broken link"
    followed = scan_images(root, follow_links=True)
    assert [p.relative_to(root).as_posix() for p in followed.paths] == [
        "ext/deep/o2.png", "ext/o1.png", "in.png", "inner.png", "one.png"]


def test_every_skipped_file_is_named_once_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from dinokit.data.images import scan_images

    _png(tmp_path / "ok.png")
    (tmp_path / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (tmp_path / "photo.heic").write_text("a text file named .heic")
    (tmp_path / "notes.txt").write_text("hello")
    _png(tmp_path / "locked.png", 3)
    _bomb_png(tmp_path / "bomb.png")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not str(p).endswith("locked.png") and real_access(p, mode))
    scan = scan_images(tmp_path)
    reasons = {Path(p).name: r for p, r in scan.skipped}
    assert [p.name for p in scan.paths] == ["bomb.png", "ok.png"]  # the header is not read without max_pixels
    assert reasons == {"logo.svg": "unsupported type (.svg)", "photo.heic": "unsupported type (.heic)",
                       "notes.txt": "not an image (.txt)", "locked.png": "unreadable (permission denied)"}
    checked = scan_images(tmp_path, max_pixels=10_000)
    assert dict((Path(p).name, r.split(" (")[0]) for p, r in checked.skipped)["bomb.png"] == "too large"
    caplog.clear()
    with caplog.at_level("WARNING"):
        list_images(tmp_path)
    assert sorted(r.getMessage() for r in caplog.records if "skipped" in r.getMessage()) == sorted(
        f"skipped {tmp_path / n}: {r}" for n, r in reasons.items())  # each once


def test_pixel_limit_is_a_parameter_the_user_can_raise(tmp_path: Path) -> None:
    _png(tmp_path / "big.png", size=100)
    with pytest.raises(ImageError, match=r"big.png: too large \(100x100 = 10000 pixels, over the limit of 5000"):
        load_rgb(tmp_path / "big.png", max_pixels=5000)
    assert load_rgb(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)
    _bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match=r"bomb.png: too large \(.*1600000000 pixels.*raise max_pixels"):
        load_rgb(tmp_path / "bomb.png")  # refused from the header, before any decoding
    with pytest.raises(ImageError, match=r"bomb.png: (truncated|corrupt)"):
        load_rgb(tmp_path / "bomb.png", max_pixels=2_000_000_000)  # raised: decoding is tried, and fails
    (tmp_path / "x.svg").write_text("<svg/>")
    with pytest.raises(ImageError, match=r"x.svg: unsupported type \(.svg\)"):
        load_rgb(tmp_path / "x.svg")


def test_labeled_folder_walks_once_and_ignores_loops(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        for i in range(2):
            _png(tmp_path / cls / f"{i}.png", i)
    (tmp_path / "cat" / "up").symlink_to("..")
    paths, labels, classes = labeled_folder(tmp_path)
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 1, 1]
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
