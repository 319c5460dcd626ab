"""Evaluation pictures: a confusion matrix and a per-class accuracy bar chart (PNG, matplotlib Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinokit._io import atomic_path


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width, height), dpi=100)


def _save(fig: Any, path: Path) -> Path:
    """Write the PNG atomically (temp file in the same folder, then rename) and close the figure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_confusion(confusion: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str],
                   path: str | os.PathLike[str], title: str = "Confusion matrix") -> Path:
    """Row-normalized confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    cm = np.asarray(confusion, dtype=np.int64)
    c = len(classes)
    if cm.shape != (c, c):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {c} classes")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = min(4 + 0.45 * c, 40)
    fig = _figure(size + 1.5, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= 40:  # names and counts stay readable up to about 40 classes
        ax.set_xticks(range(c), labels=list(classes), rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(c), labels=list(classes), fontsize=8)
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return _save(fig, Path(path))


def plot_per_class(accuracy: Sequence[float | None], classes: Sequence[str], path: str | os.PathLike[str],
                   title: str = "Per-class top-1 accuracy", overall: float | None = None) -> Path:
    """Horizontal bars of per-class accuracy (percent); classes without val images are left empty."""
    if len(accuracy) != len(classes):
        raise ValueError(f"{len(accuracy)} accuracies for {len(classes)} classes")
    vals = np.array([np.nan if a is None else float(a) for a in accuracy])
    c = len(classes)
    fig = _figure(7, min(1.5 + 0.3 * c, 60))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(c), np.nan_to_num(vals), color="tab:blue")
    ax.set_yticks(range(c), labels=list(classes), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("top-1 accuracy (%)")
    if overall is not None:
        ax.axvline(overall, color="tab:red", linestyle="--", label=f"overall {overall:.1f}%")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08 - 1.2 / fig.get_figheight()), frameon=False)
    for i, v in enumerate(vals):
        if np.isnan(v):
            ax.text(1, i, "no images", va="center", fontsize=7)
        elif v > 85:  # inside the bar's end, so the label never leaves the axes
            ax.text(v - 1, i, f"{v:.1f}", va="center", ha="right", fontsize=7, color="white")
        else:
            ax.text(v + 1, i, f"{v:.1f}", va="center", fontsize=7)
    ax.set_title(title)
    return _save(fig, Path(path))
