"""Fashion-MNIST read straight from its IDX files (no torchvision download logic).

Spec syntax used by the CLI and recipes: ``fashion-mnist[:PATH][@train|@test][#N]``

- ``PATH``: folder holding the four IDX files (``.gz`` or raw); default
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
- ``@split``: which split; when omitted the caller's default is used (train for training
  and ``--train``, test for ``--val``).
- ``#N``: keep the first N images (deterministic small slices for tests and demos).
"""

from __future__ import annotations

import gzip
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPEC = re.compile(r"^fashion-mnist(?::(?P<path>[^@#]+))?(?:@(?P<split>train|test))?(?:#(?P<n>\d+))?$")


@dataclass(frozen=True)
class FashionMNISTSpec:
    root: Path
    split: str
    limit: int | None


def is_fashion_mnist_spec(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith("fashion-mnist")


def parse_spec(spec: str, default_split: str = "train") -> FashionMNISTSpec:
    """Parse ``fashion-mnist[:PATH][@split][#N]``; raise ValueError naming the spec when malformed."""
    m = _SPEC.match(spec.strip())
    if m is None:
        raise ValueError(f"{spec}: not a Fashion-MNIST spec; expected fashion-mnist[:PATH][@train|@test][#N]")
    root = Path(m["path"]) if m["path"] else DEFAULT_ROOT
    n = int(m["n"]) if m["n"] else None
    return FashionMNISTSpec(root=root, split=m["split"] or default_split, limit=n)


def _open_idx(root: Path, stem: str) -> bytes:
    for name in (stem + ".gz", stem):
        path = root / name
        if path.is_file():
            opener = gzip.open if name.endswith(".gz") else open
            try:
                with opener(path, "rb") as f:
                    return f.read()
            except (OSError, EOFError) as e:
                raise ValueError(f"{path}: unreadable IDX file ({e})") from e
    raise FileNotFoundError(
        f"{root / (stem + '.gz')}: Fashion-MNIST file not found "
        "(install it with `apt-get install -y dataset-fashion-mnist` or pass fashion-mnist:PATH)"
    )


def _parse_idx(data: bytes, source: str) -> np.ndarray:
    """Decode an IDX byte string (magic 0x0000 08 ndim, big-endian dims, uint8 payload)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{source}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise ValueError(f"{source}: truncated IDX file ({payload.size} bytes for shape {dims})")
    return payload.reshape(dims)


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images (N, 28, 28) uint8, labels (N,) int64)`` for ``split`` in {train, test}."""
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    root = Path(root) if root is not None else DEFAULT_ROOT
    img_stem, lab_stem = _FILES[split]
    images = _parse_idx(_open_idx(root, img_stem), str(root / img_stem))
    labels = _parse_idx(_open_idx(root, lab_stem), str(root / lab_stem)).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def load_spec(spec: str, default_split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load the images and labels a ``fashion-mnist[...]`` spec names."""
    s = parse_spec(spec, default_split)
    return load_fashion_mnist(s.split, s.root, s.limit)
