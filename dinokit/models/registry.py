"""The registry of known DINO weights, read from ``registry.json`` (data, not code).

hubconf.py, the CLI (``dinokit models``) and :func:`dinokit.load` all read it. Official files are
fetched through torch.hub's cache (``$TORCH_HOME/hub/checkpoints/<file_name>``), so a file placed
there by hand is used without any network access.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class WeightsNotFoundError(FileNotFoundError):
    """A registry file is not in the torch.hub cache and cannot be downloaded."""


# Where DINOv3 weights are requested: Meta emails signed download links after a form.
DINOV3_REQUEST_PAGE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


@dataclass(frozen=True)
class ModelEntry:
    """One known set of DINO weights: where to get them, what they are, what they score."""

    name: str
    description: str
    arch: str
    url: str
    file_name: str
    embed_dim: int
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str
    knn_top1: float | None = None
    linear_top1: float | None = None
    linear_features: str = "cls"
    patch_size: int | None = None
    params_m: float | None = None
    sha256: str | None = None
    timm_hub_id: str | None = None
    hf_transformers_id: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    family: str = "dino"
    pos_embed_resize: str | None = None
    crop_mode: str = "center"
    gated: bool = False

    @property
    def config(self) -> dict[str, Any]:
        """The backbone config (timm architecture, model_args, preprocessing, position resize)."""
        return {"architecture": self.arch, "model_args": dict(self.model_args),
                "pretrained_cfg": self.pretrained_cfg, "dinokit": {"pos_embed_resize": self.pos_embed_resize}}

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Preprocessing for :func:`dinokit.models.backbone.create_backbone` (timm pretrained_cfg keys)."""
        return {"input_size": tuple(self.input_size), "mean": tuple(self.mean), "std": tuple(self.std),
                "crop_pct": self.crop_pct, "interpolation": self.interpolation, "crop_mode": self.crop_mode}

    def cache_path(self) -> Path:
        """Where torch.hub keeps (and looks for) the official file."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self.file_name

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"], d["mean"], d["std"] = list(self.input_size), list(self.mean), list(self.std)
        return d


@cache
def _entries() -> tuple[ModelEntry, ...]:
    raw = json.loads(resources.files("dinokit.models").joinpath("registry.json").read_text())
    out = []
    for item in raw["models"]:
        item = dict(item)
        for key in ("input_size", "mean", "std"):
            item[key] = tuple(item[key])
        out.append(ModelEntry(**item))
    return tuple(out)


def list_models() -> list[ModelEntry]:
    """All registry entries, in registry order."""
    return list(_entries())


def model_names() -> list[str]:
    return [e.name for e in _entries()]


def get_entry(name: str) -> ModelEntry:
    """The entry called ``name``; KeyError listing the known names otherwise."""
    for e in _entries():
        if e.name == name:
            return e
    raise KeyError(f"{name}: not a registry model; known: {', '.join(model_names())}")


def is_registry_name(name: str) -> bool:
    return any(e.name == name for e in _entries())


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("DINOKIT_OFFLINE", "HF_HUB_OFFLINE", "TORCH_HUB_OFFLINE"))


def fetch_state_dict(entry: ModelEntry) -> dict[str, torch.Tensor]:
    """The official state dict of ``entry``, through torch.hub's cache, loaded with weights_only=True.

    Offline (or when the download fails) raises :class:`WeightsNotFoundError` saying where to put
    the file.
    """
    target = entry.cache_path()
    if entry.gated and not target.is_file():
        # the plain URL answers 403 without Meta's signed link: say how to get the file instead
        raise WeightsNotFoundError(
            f"{target}: {entry.name} weights not cached; DINOv3 downloads are gated: request access at "
            f"{DINOV3_REQUEST_PAGE}, download {entry.file_name} from the link you get and put it at that path")
    if not target.is_file() and _offline():
        raise WeightsNotFoundError(
            f"{target}: {entry.name} weights not cached and offline; download {entry.url} to that path")
    try:
        sd = torch.hub.load_state_dict_from_url(entry.url, file_name=entry.file_name, map_location="cpu",
                                                progress=False, check_hash=False, weights_only=True)
    except Exception as e:  # URLError (an OSError) offline; UnpicklingError/RuntimeError for a bad file
        if target.is_file():
            raise ValueError(f"{target}: cannot load {entry.name} weights ({type(e).__name__}: {e})") from e
        raise WeightsNotFoundError(
            f"{target}: {entry.name} weights not cached and the download failed ({type(e).__name__}); "
            f"download {entry.url} to that path") from e
    if entry.sha256:
        _check_sha256(target, entry.sha256)
    return sd


def _check_sha256(path: Path, expected: str) -> None:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise ValueError(f"{path}: sha256 {h.hexdigest()[:12]}... does not match the registry ({expected[:12]}...)")
