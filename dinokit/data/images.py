"""Image files: find them, decode them robustly to RGB, and feed them to a DataLoader.

Bad files never crash a run: :func:`load_rgb` raises :class:`ImageError` ("PATH: reason"), and
:class:`ImageDataset` turns that error into a :class:`Skipped` item that :func:`collate_skipping`
drops from the batch and hands back to the caller, who reports it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# Lower-case suffixes that Pillow decodes and that people keep photos in.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})


class ImageError(ValueError):
    """An image file that cannot be used; ``str(err)`` is ``"PATH: reason"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root`` (recursive, symlinked folders followed), sorted by relative path.

    Hidden files and folders (names starting with ".") are skipped. Raises FileNotFoundError /
    NotADirectoryError naming ``root`` when it is not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and is_image_file(name):
                p = Path(dirpath) / name
                found.append((p.relative_to(root).as_posix(), p))
    # Sort on the relative POSIX path so the order is the same on every OS and filesystem.
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]


def labeled_folder(root: str | os.PathLike[str]) -> tuple[list[Path], np.ndarray, list[str]]:
    """A class-subfolder dataset (``root/<class>/**/<image>``, like torchvision's ImageFolder).

    Returns ``(paths, labels, classes)``: image paths, int64 labels (N,) indexing ``classes``
    (subfolder names, sorted). Images directly in ``root`` are ignored; empty classes are kept.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected ROOT/<class>/<image>)")
    paths: list[Path] = []
    labels: list[int] = []
    for idx, name in enumerate(classes):
        found = list_images(root / name)
        if not found:
            log.warning("%s: class folder holds no images", root / name)
        paths.extend(found)
        labels.extend([idx] * len(found))
    if not paths:
        raise ValueError(f"{root}: no images in any class subfolder")
    return paths, np.asarray(labels, dtype=np.int64), classes


def _to_uint8(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (I;16*, I, F) -> 8-bit "L", scaling by the range the mode implies."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    elif img.mode == "I":
        # 16-bit PNGs decode to "I" on some Pillow versions: values above 255 mean a 16-bit range.
        arr = arr.astype(np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
    else:  # "F": either 0..1 or 0..255 floats
        arr = arr.astype(np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> a new "RGB" image (alpha dropped like torchvision's loader, 16-bit scaled)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_uint8(img)
    elif img.mode == "P":
        # Palette images may carry transparency; going through RGBA avoids Pillow's warning.
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file fully into an "RGB" PIL image with its EXIF orientation applied.

    Raises :class:`ImageError` ("PATH: reason") for missing, empty, truncated, corrupt or
    non-image files, so callers can skip and report them.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror or e})") from e
    if size == 0:
        raise ImageError(path, "empty file")
    return decode_rgb(path, path)


def decode_rgb(source: str | os.PathLike[str] | BinaryIO, name: str | os.PathLike[str]) -> Image.Image:
    """Decode an image (a file path or a binary file object, e.g. a tar member) as :func:`load_rgb` does;
    errors are :class:`ImageError` naming ``name``."""
    path = name
    try:
        with Image.open(source) as im:
            im.load()  # decode now: truncated and corrupt data fail here, not later in a worker
            im = ImageOps.exif_transpose(im)  # returns a copy, valid after the file is closed
            return to_rgb(im)
    except Image.UnidentifiedImageError as e:
        raise ImageError(path, "not an image (unknown format)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"image too large ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        reason = str(e).strip() or type(e).__name__
        if "truncated" in reason:
            reason = f"truncated image ({reason})"
        else:
            reason = f"corrupt image ({type(e).__name__}: {reason})"
        raise ImageError(path, reason) from e


class Skipped(NamedTuple):
    """A dataset item that could not be loaded: its index, path and the reason."""

    index: int
    path: str
    reason: str


class ImageDataset(torch.utils.data.Dataset):
    """Image files -> ``(tensor, index)``; a file that fails becomes a :class:`Skipped` item.

    ``transform`` maps an RGB PIL image to a tensor (e.g. :func:`dinokit.data.transforms.eval_transform`).
    Use with ``collate_fn=collate_skipping`` so failures are dropped from the batch and reported.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]],
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Skipped:
        path = self.paths[index]
        try:
            return self.transform(load_rgb(path)), index
        except ImageError as e:
            return Skipped(index, path, e.reason)
        except Exception as e:  # a transform failing on a decodable image: still skip, never crash
            return Skipped(index, path, f"preprocessing failed ({type(e).__name__}: {e})")


@dataclass
class Batch:
    """A collated batch: images (B, 3, H, W) or None when every item failed, their dataset indices (B,),
    and the items that were skipped."""

    images: torch.Tensor | None
    indices: torch.Tensor
    skipped: list[Skipped] = field(default_factory=list)

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate_skipping(items: Sequence[Any]) -> Batch:
    """DataLoader collate_fn for :class:`ImageDataset`: stack the good items, collect the skipped ones."""
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    images = torch.stack([x for x, _ in good]) if good else None
    indices = torch.tensor([i for _, i in good], dtype=torch.long)
    return Batch(images, indices, skipped)
