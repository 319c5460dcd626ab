"""Image files: find them, decode them robustly to RGB, and feed them to a DataLoader.

Bad files never crash a run: :func:`load_rgb` raises :class:`ImageError` ("PATH: reason"), and
:class:`ImageDataset` turns that error into a :class:`Skipped` item that :func:`collate_skipping`
drops from the batch and hands back to the caller, who reports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error
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


# Image formats Pillow does not decode here (or that dinokit does not take): files with these
# suffixes are named as "unsupported type" rather than silently ignored.
UNSUPPORTED_IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".svg", ".svgz", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".psd", ".eps", ".ai", ".pdf",
    ".exr", ".hdr", ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".xcf",
})
# Pillow's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS): the default limit.
DEFAULT_MAX_PIXELS = 2 * 89_478_485


class ImageError(ValueError):
    """An image file that cannot be used; ``str(err)`` is ``"PATH: reason"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageScan(NamedTuple):
    """What a folder walk found: image paths (sorted by relative path) and the files it skipped,
    each once, as ``(path, reason)``."""

    paths: list[Path]
    skipped: list[tuple[str, str]]


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _type_reason(name: str) -> str | None:
    """Why a file name is not taken as an image (None when its suffix is one of ours)."""
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return None
    if ext in UNSUPPORTED_IMAGE_EXTENSIONS:
        return f"unsupported type ({ext})"
    return f"not an image ({ext or 'no suffix'})"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _link_reason(entry: os.DirEntry[str], root_real: str, follow_links: bool) -> str | None:
    """Why a symlink is not followed (None when it is)."""
    target = os.path.realpath(entry.path)
    if not os.path.exists(target):
        return "broken link"
    if not follow_links and not _inside(target, root_real):
        return "link outside the folder (follow_links=True / --follow-links to follow it)"
    return None


def _file_reason(entry: os.DirEntry[str], max_pixels: int | None) -> str | None:
    """Why a file found by the walk is skipped (None when it is an image to use)."""
    if not entry.is_file():
        return "not a regular file"
    reason = _type_reason(entry.name)
    if reason is None and not os.access(entry.path, os.R_OK):
        reason = "unreadable (permission denied)"
    if reason is None and max_pixels is not None:
        try:
            _check_header(entry.path, max_pixels)
        except ImageError as e:
            reason = e.reason
    return reason


def _scan_dir(folder: Path, root_real: str, follow_links: bool, max_pixels: int | None,
              found: list[Path], skipped: list[tuple[str, str]]) -> list[Path]:
    """One folder of the walk: images into ``found``, skips into ``skipped``; returns its subfolders."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        skipped.append((str(folder), f"unreadable folder ({e.strerror or type(e).__name__})"))
        return []
    subdirs = []
    for entry in entries:
        if entry.name.startswith("."):  # hidden files, and dinokit's own temporary files
            continue
        try:
            reason = _link_reason(entry, root_real, follow_links) if entry.is_symlink() else None
            if reason is None and entry.is_dir():
                subdirs.append(Path(entry.path))
                continue
            reason = reason or _file_reason(entry, max_pixels)
        except OSError as e:  # e.g. ELOOP from a chain of links: name it, keep walking
            reason = f"unreadable ({e.strerror or type(e).__name__})"
        if reason is None:
            found.append(Path(entry.path))
        else:
            skipped.append((entry.path, reason))
    return subdirs


def _first_visit(seen: set[tuple[int, int]], st: os.stat_result) -> bool:
    """The loop guard: True the first time a real folder (device, inode) is reached."""
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def scan_images(root: str | os.PathLike[str], *, follow_links: bool = False,
                max_pixels: int | None = None) -> ImageScan:
    """Walk ``root`` for image files, naming each file it skips once with its reason.

    Each real folder is visited once (by device and inode), so a link loop (``sub/loop -> ..``)
    or two links to one folder add nothing. Links (to files or folders) that lead outside ``root``
    are skipped unless ``follow_links``. Skip reasons: not an image, unsupported type (.svg,
    .heic, ...), unreadable, broken link, link outside the folder, and with ``max_pixels`` (which
    opens each file's header) too large or not an image by content. Hidden names are ignored.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    root_real = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError as e:
            skipped.append((str(folder), f"unreadable folder ({e.strerror or type(e).__name__})"))
            continue
        if not _first_visit(seen, st):  # a link loop or a second way into a visited folder
            log.debug("%s: folder already visited, not walked again", folder)
            continue
        stack.extend(_scan_dir(folder, root_real, follow_links, max_pixels, found, skipped))
    # Sort on the relative POSIX path so the order is the same on every OS and filesystem.
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    skipped.sort()
    return ImageScan(found, skipped)


def log_skipped(skipped: Sequence[tuple[str, str]], limit: int = 10) -> None:
    """Log skipped files once each, up to ``limit`` per kind of reason, then a count per kind."""
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for path, reason in skipped:
        by_kind.setdefault(reason.split(" (")[0], []).append((path, reason))
    for kind, items in by_kind.items():
        for path, reason in items[:limit]:
            log.warning("skipped %s: %s", path, reason)
        if len(items) > limit:
            log.warning("skipped %d more files: %s", len(items) - limit, kind)


def list_images(root: str | os.PathLike[str], *, follow_links: bool = False) -> list[Path]:
    """All image files under ``root`` (recursive), sorted by relative path; see :func:`scan_images`.

    Skipped files are logged once each (WARNING). Raises FileNotFoundError / NotADirectoryError
    naming ``root`` when it is not a folder.
    """
    scan = scan_images(root, follow_links=follow_links)
    log_skipped(scan.skipped)
    return scan.paths


def labeled_folder(root: str | os.PathLike[str], *,
                   follow_links: bool = False) -> tuple[list[Path], np.ndarray, list[str]]:
    """A class-subfolder dataset (``root/<class>/**/<image>``, like torchvision's ImageFolder).

    Returns ``(paths, labels, classes)``: image paths, int64 labels (N,) indexing ``classes``
    (subfolder names, sorted). Images directly in ``root`` are ignored; empty classes are kept.
    One walk of ``root`` (:func:`scan_images`): a class folder that links outside ``root`` is
    skipped unless ``follow_links``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected ROOT/<class>/<image>)")
    scan = scan_images(root, follow_links=follow_links)
    log_skipped(scan.skipped)
    index = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for p in scan.paths:
        parts = p.relative_to(root).parts
        if len(parts) > 1 and parts[0] in index:
            paths.append(p)
            labels.append(index[parts[0]])
    for name in sorted(set(classes) - {classes[i] for i in set(labels)}):
        log.warning("%s: class folder holds no images", root / name)
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


def _allow_pixels(max_pixels: int | None) -> None:
    """Raise (never lower) Pillow's own bomb limit so that ``max_pixels`` is the one that applies."""
    if max_pixels is None:
        Image.MAX_IMAGE_PIXELS = None
    elif Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # its warning starts there, its error at twice that


def _check_pixels(path: str | os.PathLike[str], size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(path, f"too large ({w}x{h} = {w * h} pixels, over the limit of {max_pixels}; "
                               "raise max_pixels to allow it)")


def _check_header(path: str | os.PathLike[str], max_pixels: int | None) -> None:
    """Read only the header: ImageError when the file is not an image or has too many pixels."""
    _allow_pixels(max_pixels)
    with _decode_errors(path), Image.open(path) as im:
        _check_pixels(path, im.size, max_pixels)


def load_rgb(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file fully into an "RGB" PIL image with its EXIF orientation applied.

    Raises :class:`ImageError` ("PATH: reason") for missing, unreadable, empty, truncated, corrupt,
    unsupported or non-image files and for images of more than ``max_pixels`` pixels (checked
    from the header, before decoding; None: no limit), so callers can skip and report them.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below; only opening errors caught here
    except PermissionError as e:
        raise ImageError(path, "unreadable (permission denied)") from e
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror or e})") from e
    with f:
        if size == 0:
            raise ImageError(path, "empty file")
        ext = path.suffix.lower()
        if ext in UNSUPPORTED_IMAGE_EXTENSIONS:
            raise ImageError(path, f"unsupported type ({ext})")
        return decode_rgb(f, path, max_pixels=max_pixels)


def decode_rgb(source: str | os.PathLike[str] | BinaryIO, name: str | os.PathLike[str], *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image (a file path or a binary file object, e.g. a tar member) as :func:`load_rgb`
    does; errors are :class:`ImageError` naming ``name``."""
    path = name
    _allow_pixels(max_pixels)
    with _decode_errors(path), Image.open(source) as im:
        _check_pixels(path, im.size, max_pixels)
        im.load()  # decode now: truncated and corrupt data fail here, not later in a worker
        upright = ImageOps.exif_transpose(im)  # returns a copy, valid after the file is closed
        return to_rgb(upright)


@contextlib.contextmanager
def _decode_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn what Pillow raises on a bad file (many exception types) into one :class:`ImageError`."""
    try:
        yield
    except ImageError:
        raise
    except Image.UnidentifiedImageError as e:
        raise ImageError(path, "not an image (unknown format)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"too large ({str(e).rstrip('.')}; raise max_pixels to allow it)") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError,
            struct_error, ZeroDivisionError, OverflowError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        if "truncated" in reason:
            reason = f"truncated image ({reason})"
        else:
            reason = f"corrupt image ({type(e).__name__}: {reason})"
        raise ImageError(path, reason) from e


class Skipped(NamedTuple):
    """A dataset item that could not be loaded: its index, path and the reason."""

    # the public field name shadows tuple.index(); mypy flags any NamedTuple field named so
    index: int  # type: ignore[assignment]
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
