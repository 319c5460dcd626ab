"""Batched feature extraction: folders, path lists or arrays -> an :class:`Embeddings` table.

Decoding and resizing run in DataLoader worker processes while the model runs in the main
process, so the two overlap. Unreadable images are skipped and reported (``strict=True`` makes
them an error). Inference runs under ``torch.inference_mode``; on CUDA with bf16 autocast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dinokit._io import atomic_path
from dinokit._validate import one_line
from dinokit.data.images import (
    Batch,
    ImageDataset,
    ImageError,
    Skipped,
    collate_skipping,
    list_images,
)
from dinokit.data.transforms import eval_transform, preprocessing_config

log = logging.getLogger(__name__)

FEATURE_KINDS = ("cls", "cls+avgpool", "last4", "patch")
_LAST_N = re.compile(r"^last(\d+)$")

ImagesLike = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | np.ndarray | torch.Tensor


# ------------------------------------------------------------------------------------ features


def check_features(features: str) -> str:
    """Return ``features`` when it names a known kind, else raise ValueError."""
    m = _LAST_N.match(features)
    if features in FEATURE_KINDS or (m is not None and int(m.group(1)) >= 1):
        return features
    raise ValueError(f"features={features!r}: expected one of cls, cls+avgpool, lastN (e.g. last4), patch")


def feature_dim(model: nn.Module, features: str = "cls") -> int:
    """Width D of one row of ``compute_features(model, x, features)`` (per token for "patch")."""
    d = int(model.num_features)
    if features == "cls+avgpool":
        return 2 * d
    m = _LAST_N.match(features)
    return d * int(m.group(1)) if m else d


def compute_features(model: nn.Module, x: torch.Tensor, features: str = "cls") -> torch.Tensor:
    """Features of a preprocessed batch x (B, 3, H, W).

    - ``cls``: ``model(x)`` (B, D): the CLS token after the final norm (pooled features for CNNs).
    - ``cls+avgpool``: CLS concatenated with the mean patch token of the last block (B, 2D), the
      official ViT-B linear-eval features.
    - ``lastN`` (e.g. ``last4``): CLS of the last N blocks, each through the final norm,
      concatenated (B, N*D), the official ViT-S linear-eval features.
    - ``patch``: the patch tokens of the last block after the final norm (B, P, D).
    """
    if features == "cls":
        return model(x)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(f"features={features!r} needs a ViT backbone; {type(model).__name__} only supports 'cls'")
    npre = int(model.num_prefix_tokens)
    if features in ("cls+avgpool", "patch"):
        tokens = model.forward_features(x)  # (B, npre + P, D), final norm applied
        patches = tokens[:, npre:]
        if features == "patch":
            return patches
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)
    n = int(_LAST_N.match(check_features(features)).group(1))
    if n > len(model.blocks):
        raise ValueError(f"features={features!r}: the model has only {len(model.blocks)} blocks")
    inter = model.forward_intermediates(x, indices=n, return_prefix_tokens=True, norm=True,
                                        output_fmt="NLC", intermediates_only=True, stop_early=True)
    return torch.cat([prefix[:, 0] for _, prefix in inter], dim=-1)


# ------------------------------------------------------------------------------------ results


@dataclass
class Embeddings:
    """Features of a set of images.

    features: float32 CPU tensor (N, D) (or (N, P, D) for patch tokens); paths: N names, relative to
    the folder when a folder was embedded, "0", "1", ... for arrays; skipped: (path, reason) of the
    files that could not be read; info: model identity and settings.
    """

    features: torch.Tensor
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def numpy(self) -> np.ndarray:
        return self.features.numpy()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``.npz`` (arrays features, paths, info), ``.npy`` (features only) or ``.safetensors``
        (tensor features; paths and info in the metadata), atomically. Returns the path."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".npz", ".npy", ".safetensors"):
            raise ValueError(f"{path}: unknown feature file type; use .npz, .npy or .safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        feats = self.features.detach().to("cpu", torch.float32).contiguous()
        info = json.dumps(self.info, default=str)
        with atomic_path(path) as tmp:
            if suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file({"features": feats}, str(tmp),
                          metadata={"paths": json.dumps(self.paths), "info": info, "format": "pt"})
            else:
                with open(tmp, "wb") as f:
                    if suffix == ".npy":
                        np.save(f, feats.numpy())
                    else:
                        np.savez(f, features=feats.numpy(), paths=np.asarray(self.paths, dtype=str),
                                 info=np.asarray(info))
        return path


def load_embeddings(path: str | os.PathLike[str]) -> Embeddings:
    """Read a file written by :meth:`Embeddings.save` (``.npy`` files get paths "0", "1", ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    info: dict[str, Any] = {}
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                feats = f.get_tensor("features")
            paths = json.loads(meta["paths"]) if "paths" in meta else [str(i) for i in range(len(feats))]
            info = json.loads(meta.get("info", "{}"))
        elif suffix == ".npy":
            feats = torch.from_numpy(np.load(path, allow_pickle=False))
            paths = [str(i) for i in range(len(feats))]
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                feats = torch.from_numpy(z["features"])
                paths = [str(p) for p in z["paths"]] if "paths" in z else [str(i) for i in range(len(feats))]
                if "info" in z:
                    info = json.loads(str(z["info"]))
        else:
            raise ValueError(f"{path}: unknown feature file type; use .npz, .npy or .safetensors")
    except Exception as e:  # BadZipFile, EOFError, SafetensorError, numpy's ValueErrors: one line naming the file
        raise ValueError(f"{path}: not a dinokit feature file ({type(e).__name__}: {one_line(str(e))})") from e
    if len(paths) != len(feats):
        raise ValueError(f"{path}: {len(feats)} feature rows but {len(paths)} paths")
    return Embeddings(feats.float(), paths, [], info)


# ------------------------------------------------------------------------------------ inputs


class _ArrayDataset(torch.utils.data.Dataset):
    """uint8 images (N, H, W) or (N, H, W, C) -> (preprocessed tensor, index)."""

    def __init__(self, array: np.ndarray, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.array = array
        self.transform = transform

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        a = self.array[index]
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        return self.transform(Image.fromarray(a)), index


class _TensorDataset(torch.utils.data.Dataset):
    """Already-preprocessed float images (N, 3, H, W) -> (tensor, index)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.x[index], index


def _dataset(images: ImagesLike, transform: Callable[[Image.Image], torch.Tensor]
             ) -> tuple[torch.utils.data.Dataset, list[str], bool]:
    """(dataset, names, decodes_files) for any accepted ``images`` value."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            images = images.cpu().numpy()
        elif images.is_floating_point():
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"float image tensor must be (N, 3, H, W) model input, got {tuple(images.shape)}")
            return _TensorDataset(images), [str(i) for i in range(len(images))], False
        else:
            raise ValueError(f"image tensor dtype {images.dtype}: expected uint8 images or float model input")
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"image array dtype {images.dtype}: expected uint8 (N, H, W) or (N, H, W, 3)")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
            raise ValueError(f"image array shape {images.shape}: expected (N, H, W) or (N, H, W, 3)")
        return _ArrayDataset(images, transform), [str(i) for i in range(len(images))], False
    if isinstance(images, (str, os.PathLike)):
        root = Path(images)
        if root.is_dir():
            paths = list_images(root)
            if not paths:
                raise ValueError(f"{root}: no image files found (extensions: jpg, png, webp, ...)")
            names = [p.relative_to(root).as_posix() for p in paths]
            return ImageDataset(paths, transform), names, True
        if root.is_file():
            return ImageDataset([root], transform), [str(root)], True
        raise FileNotFoundError(f"{root}: no such file or folder")
    paths = [Path(p) for p in images]
    return ImageDataset(paths, transform), [str(p) for p in paths], True


def _default_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is not None and p.device.type != "cpu":
        return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_num_workers() -> int:
    """Decoding workers: all cores but the one the main process feeds the model from, at most 8."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n - 1))


# ------------------------------------------------------------------------------------ embed


def embed(
    model: nn.Module | str,
    images: ImagesLike,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    image_size: int | None = None,
    features: str = "cls",
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Embeddings:
    """Embed images with ``model`` (moved to ``device``) and return features in input order.

    ``images``: a folder (recursive, sorted), a list of image paths, uint8 images (N, H, W) or
    (N, H, W, 3) as numpy array or tensor (these get the model's eval preprocessing), or a float
    tensor (N, 3, H, W) taken as ready model input. ``features``: see :func:`compute_features`.
    A model in training mode is put back in training mode afterwards. Unreadable files are
    skipped and listed in ``Embeddings.skipped``; ``strict=True`` raises
    :class:`~dinokit.data.images.ImageError` on the first one. ``progress(done, total)`` is called
    after each batch.
    """
    if isinstance(model, (str, os.PathLike)):
        from dinokit.hub import load

        model = load(str(model))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_features(features)
    dev = torch.device(device) if device is not None else _default_device(model)
    transform = eval_transform(model, image_size)
    dataset, names, decodes = _dataset(images, transform)
    total = len(dataset)
    loader: Any
    if isinstance(dataset, _TensorDataset):
        # Ready model input already in memory: slice it, no workers, no per-item copies.
        x_all = dataset.x
        loader = (Batch(x_all[i:i + batch_size], torch.arange(i, min(i + batch_size, total)))
                  for i in range(0, total, batch_size))
    else:
        workers = default_num_workers() if num_workers is None else int(num_workers)
        workers = min(workers, max(0, (total + batch_size - 1) // batch_size))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
            collate_fn=collate_skipping, pin_memory=dev.type == "cuda",
            prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
        )
    was_training = model.training
    model = model.to(dev).eval()
    use_bf16 = dev.type == "cuda"
    chunks: list[torch.Tensor] = []
    kept: list[int] = []
    skipped: list[Skipped] = []
    done = 0
    with torch.inference_mode(), _restore_mode(model, was_training):
        for batch in loader:
            skipped.extend(batch.skipped)
            if strict and batch.skipped:
                s = batch.skipped[0]
                raise ImageError(s.path, s.reason)
            if batch.images is not None:
                x = batch.images.to(dev, non_blocking=True)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    y = compute_features(model, x, features)
                chunks.append(y.float().cpu())
                kept.extend(batch.indices.tolist())
            done += len(batch.indices) + len(batch.skipped)
            if progress is not None:
                progress(done, total)
    if chunks:
        feats = torch.cat(chunks)
    else:
        d = feature_dim(model, features)
        feats = torch.empty((0, d), dtype=torch.float32)
    if skipped:
        log.warning("skipped %d unreadable files (first: %s: %s)", len(skipped), skipped[0].path, skipped[0].reason)
    for s in skipped:
        log.debug("skipped %s: %s", s.path, s.reason)
    identity = _identity(model)
    info = {**identity, "features": features,
            "image_size": preprocessing_config(model, image_size)["crop_size"] if decodes or
            isinstance(dataset, _ArrayDataset) else None}
    return Embeddings(feats, [names[i] for i in kept], [(names[s.index], s.reason) for s in skipped], info)


@contextlib.contextmanager
def _restore_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put a model that was training back into training mode afterwards (embed runs it in eval)."""
    try:
        yield
    finally:
        model.train(training)


def _identity(model: nn.Module) -> dict[str, Any]:
    try:
        from dinokit.models.backbone import identity

        ident = identity(model)
        return {"model": ident["name"], "arch": ident["arch"], "fingerprint": ident["fingerprint"]}
    except Exception as e:  # a model without pretrained_cfg: features are still valid
        log.debug("no model identity: %s", e)
        return {"model": type(model).__name__}
