"""PCA pictures of patch features (the DINOv2 picture): foreground from the first component,
colours from a 3-component PCA of the foreground patches, next to the image and its attention.

A first PCA over all patches of an image gives a first component that separates object from
background; patches whose min-max scaled first component exceeds ``threshold`` are foreground
(the sign is chosen so that the image border is mostly background). A second PCA over the
foreground patches gives three components, each min-max scaled to [0, 1], shown as RGB; the
background is black.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dinokit._io import atomic_path

log = logging.getLogger(__name__)


@dataclass
class PCAPicture:
    """PCA of one image's patch features.

    image: the RGB image the model saw (W x H, multiples of the patch); rgb: float32 (h, w, 3) in
    [0, 1] at patch resolution (background black); foreground: bool (h, w); first: float32 (h, w)
    the min-max scaled first component; attention: float32 (H, W) mean CLS attention over heads
    (None for models without attention); patch_size: pixels per patch.
    """

    image: Image.Image
    rgb: np.ndarray
    foreground: np.ndarray
    first: np.ndarray
    attention: np.ndarray | None
    patch_size: int

    def rgb_image(self) -> Image.Image:
        """The PCA colours upsampled to the image size (nearest: one colour per patch)."""
        pic = Image.fromarray((self.rgb * 255).round().astype(np.uint8), mode="RGB")
        return pic.resize(self.image.size, Image.Resampling.NEAREST)


def _components(x: torch.Tensor, k: int) -> torch.Tensor:
    """Scores of the top-k principal components of rows x (N, D) -> (N, k), via SVD."""
    xc = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    scores = xc @ vh[:k].T
    # fix each component's sign (SVD's is arbitrary): largest absolute loading positive
    signs = torch.sign(vh[:k].gather(1, vh[:k].abs().argmax(dim=1, keepdim=True))).T
    return scores * signs


def _minmax(v: torch.Tensor) -> torch.Tensor:
    lo, hi = v.min(dim=0).values, v.max(dim=0).values
    return (v - lo) / (hi - lo).clamp_min(1e-12)


def pca_rgb(patches: torch.Tensor, h: int, w: int, threshold: float = 0.5
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patch features (h*w, D) -> (rgb (h, w, 3), foreground (h, w), first component (h, w)).

    See the module docstring. Fewer than 3 foreground patches: all patches are used for colours.
    """
    if patches.shape[0] != h * w:
        raise ValueError(f"expected {h}x{w} patch features, got {patches.shape[0]}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold}: must be in [0, 1]")
    x = patches.detach().to("cpu", torch.float64)
    first = _minmax(_components(x, 1))[:, 0].reshape(h, w)
    border = torch.cat([first[0], first[-1], first[:, 0], first[:, -1]])
    if border.mean() > first.mean():  # the border is mostly background: flip so it scores low
        first = 1 - first
    fg = first > threshold
    sel = fg.reshape(-1) if int(fg.sum()) >= 3 else torch.ones(h * w, dtype=torch.bool)
    k = min(3, int(sel.sum()) - 1, x.shape[1])
    rgb = torch.zeros(h * w, 3, dtype=torch.float64)
    if k > 0:
        rgb[sel, :k] = _minmax(_components(x[sel], k))
    rgb[~fg.reshape(-1)] = 0
    return (rgb.reshape(h, w, 3).numpy().astype(np.float32), fg.numpy(),
            first.numpy().astype(np.float32))


@torch.no_grad()
def pca_picture(model: nn.Module, image: Image.Image | str | os.PathLike[str], image_size: int = 448,
                threshold: float = 0.5, device: str | torch.device | None = None) -> PCAPicture:
    """The PCA picture of ``image``: resize the short side to ``image_size`` (as attention maps do),
    embed the patches (normalized patch tokens), PCA them, and take the mean CLS attention."""
    from dinokit.attention import NoAttentionError, _patch_size, _vit, attention_maps, prepare_image
    from dinokit.models.features import compute_features

    vit = _vit(model)
    p = _patch_size(vit)
    x, img = prepare_image(model, image, image_size)
    dev = torch.device(device) if device is not None else next(vit.parameters()).device
    patches = compute_features(model, x.to(dev), "patch")[0]  # (P, D)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    rgb, fg, first = pca_rgb(patches, h, w, threshold)
    try:
        attention: np.ndarray | None = attention_maps(model, img, image_size=(img.height, img.width),
                                                      threshold=None, device=dev).mean
    except NoAttentionError as e:
        log.info("no attention panel: %s", e)
        attention = None
    return PCAPicture(image=img, rgb=rgb, foreground=fg, first=first, attention=attention, patch_size=p)


def figure(pic: PCAPicture, title: str | None = None) -> Image.Image:
    """Image, mean attention and PCA side by side, each with a title, as one RGB image."""
    # a Figure with its own Agg canvas: no pyplot, so no global backend or figure registry is touched
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: list[tuple[str, object, str | None]] = [("image", pic.image, None)]
    if pic.attention is not None:
        panels.append(("mean attention (CLS, last block)", pic.attention, "inferno"))
    panels.append((f"PCA of patch features ({int(pic.foreground.sum())} foreground patches)",
                   pic.rgb_image(), None))
    ratio = pic.image.width / pic.image.height
    fig = Figure(figsize=(4 * ratio * len(panels), 4.6))
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, data, cmap) in zip(axes[0], panels, strict=True):
        ax.imshow(data, cmap=cmap)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy(), mode="RGB")


def save_pca(pic: PCAPicture, out_dir: str | os.PathLike[str], stem: str, title: str | None = None
             ) -> list[Path]:
    """Write ``<stem>_pca.png`` (the PCA colours at image size) and ``<stem>_figure.png`` (image,
    attention, PCA with titles) into ``out_dir`` atomically. Returns the two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, img in ((f"{stem}_pca.png", pic.rgb_image()), (f"{stem}_figure.png", figure(pic, title))):
        path = out / name
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
        written.append(path)
    return written
