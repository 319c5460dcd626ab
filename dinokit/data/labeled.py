"""Labeled data sets for evaluation: a class-subfolder image folder or a Fashion-MNIST spec.

``resolve_labeled(arg, default_split)`` turns a CLI argument into images that :func:`dinokit.embed`
accepts, int64 labels and class names:

- ``DIR`` with ``DIR/<class>/<image>`` (torchvision ImageFolder layout): image paths.
- ``fashion-mnist[:PATH][@train|@test][#N]``: raw uint8 images (N, 28, 28) read from the IDX files,
  embedded with the model's official eval preprocessing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinokit.data import fashion_mnist
from dinokit.data.images import labeled_folder


@dataclass
class LabeledData:
    """images: list of paths or a uint8 array (N, H, W[, 3]); labels: int64 (N,) indexing ``classes``."""

    images: list[Path] | np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """Identifies the content: array bytes, or file paths + sizes + modification times."""
        return data_fingerprint(self.images, self.labels)

    def subset(self, keep: np.ndarray) -> LabeledData:
        """The items at integer positions ``keep`` (e.g. the images that embedded without error)."""
        imgs = self.images[keep] if isinstance(self.images, np.ndarray) else [self.images[i] for i in keep]
        return LabeledData(imgs, self.labels[keep], self.classes, self.name, self.root)


def data_fingerprint(images: list[Path] | np.ndarray, labels: np.ndarray | None = None) -> str:
    """sha256 (hex, 16 chars) of an image array's bytes, or of each file's path, size and mtime."""
    h = hashlib.sha256()
    if isinstance(images, np.ndarray):
        h.update(f"array{images.shape}{images.dtype}".encode())
        h.update(np.ascontiguousarray(images).tobytes())
    else:
        for p in images:
            try:
                st = os.stat(p)
                h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{os.path.abspath(p)}\0missing\n".encode())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def resolve_labeled(arg: str | os.PathLike[str], default_split: str = "train") -> LabeledData:
    """Resolve a data set argument (folder or ``fashion-mnist[...]`` spec).

    Raises FileNotFoundError / ValueError with a one-line message naming the argument.
    """
    if fashion_mnist.is_fashion_mnist_spec(str(arg)):
        spec = fashion_mnist.parse_spec(str(arg), default_split)
        images, labels = fashion_mnist.load_fashion_mnist(spec.split, spec.root, spec.limit)
        if len(images) == 0:
            raise ValueError(f"{arg}: no images selected")
        return LabeledData(images, labels.astype(np.int64), list(fashion_mnist.CLASSES), str(arg), None)

    root = Path(arg)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder (expected DIR/<class>/<image> or fashion-mnist[:PATH])")
    paths, labels, classes = labeled_folder(root)
    return LabeledData(list(paths), labels, list(classes), str(arg), root)


def align_classes(train: LabeledData, val: LabeledData) -> LabeledData:
    """``val`` with labels re-indexed into ``train.classes`` (class folders matched by name).

    Raises ValueError when val holds a class the train set does not have.
    """
    if val.classes == train.classes:
        return val
    index = {c: i for i, c in enumerate(train.classes)}
    present = sorted({val.classes[i] for i in np.unique(val.labels)})
    missing = [c for c in present if c not in index]
    if missing:
        raise ValueError(f"{val.name}: classes {missing} are not in the train set {train.name}")
    remap = np.array([index.get(c, -1) for c in val.classes], dtype=np.int64)
    return LabeledData(val.images, remap[val.labels], list(train.classes), val.name, val.root)
