"""Export a small, balanced Fashion-MNIST slice as PNG class folders for the demo and the docs.

    python recipes/data/make_fashion_mnist_pngs.py [--root /usr/share/datasets/fashion-mnist]
        [--out recipes/data/fashion-mnist-small] [--train-per-class 40] [--val-per-class 12]

Writes ``OUT/train/<class>/<index>.png`` (from the official train split) and ``OUT/val/<class>/...``
(from the test split). The first images of each class are taken, so the output is deterministic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from dinokit.data.fashion_mnist import CLASSES, DEFAULT_ROOT, load_fashion_mnist


def class_dir(name: str) -> str:
    """Folder-safe class name ("T-shirt/top" -> "T-shirt-top")."""
    return name.replace("/", "-")


def export_split(images: np.ndarray, labels: np.ndarray, out: Path, per_class: int) -> int:
    """Write the first ``per_class`` images of every class; return how many were written."""
    written = 0
    for c, name in enumerate(CLASSES):
        folder = out / class_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png", optimize=True)
            written += 1
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "fashion-mnist-small")
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=12)
    a = p.parse_args()
    xtr, ytr = load_fashion_mnist("train", a.root)
    xte, yte = load_fashion_mnist("test", a.root)
    n_tr = export_split(xtr, ytr, a.out / "train", a.train_per_class)
    n_va = export_split(xte, yte, a.out / "val", a.val_per_class)
    print(f"wrote {n_tr} train and {n_va} val PNGs under {a.out}")


if __name__ == "__main__":
    main()
