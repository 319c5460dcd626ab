"""On-disk feature cache, so evaluating the same model on the same data twice embeds only once.

The key is a hash of the model fingerprint (its weights), the data fingerprint (array bytes, or paths
+ sizes + modification times), the eval preprocessing and the feature kind. Files live in
``$DINOKIT_CACHE/features`` (default ``~/.cache/dinokit/features``), read at call time, as
``<key>.safetensors`` written atomically; images that could not be read are remembered too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dinokit import embedding
from dinokit._types import Progress
from dinokit.data.labeled import data_fingerprint
from dinokit.data.transforms import preprocessing_config
from dinokit.embedding import Embeddings, EmbedOptions, load_embeddings
from dinokit.models.backbone import fingerprint

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def cache_root() -> Path:
    """``$DINOKIT_CACHE`` or ``~/.cache/dinokit`` (read now, not at import)."""
    env = os.environ.get("DINOKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dinokit"


def feature_cache_key(model: nn.Module, data_fp: str, *, features: str = "cls",
                      image_size: int | None = None) -> str:
    """Hex key for (model weights, data, preprocessing, feature kind)."""
    pre = preprocessing_config(model, image_size)
    payload = {
        "v": CACHE_VERSION,
        "model": fingerprint(model),
        "arch": type(model).__name__,
        "data": data_fp,
        "features": features,
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def cached_embed(
    model: nn.Module,
    images: list[Path] | np.ndarray,
    options: EmbedOptions | None = None,
    *,
    use_cache: bool = True,
    data_fp: str | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> Embeddings:
    """:func:`dinokit.embed` through the feature cache; returns an ``Embeddings``.
    ``options`` (and keyword overrides of its fields) say how to embed, as for :func:`dinokit.embed`.
    A hit returns the stored features (and the stored list of skipped images) without running the
    model. ``use_cache=False`` neither reads nor writes the cache.
    """
    opts = (options or EmbedOptions()).with_overrides(**overrides)
    path = None
    if use_cache:
        key = feature_cache_key(model, data_fp or data_fingerprint(images), features=opts.features,
                                image_size=opts.image_size)
        path = cache_root() / "features" / f"{key}.safetensors"
        if path.is_file():
            try:
                emb = load_embeddings(path)
                skipped = [tuple(s) for s in emb.info.pop("skipped", [])]
                logger.info("features from cache %s", path)
                return Embeddings(emb.features, emb.paths, skipped, emb.info)
            except (ValueError, OSError) as e:  # a damaged cache file is recomputed, not fatal
                logger.warning("%s: unreadable cache entry, recomputing (%s)", path, e)
    emb = embedding.embed(model, images, opts, progress=progress)
    if path is not None:
        info = {**emb.info, "skipped": [list(s) for s in emb.skipped]}
        Embeddings(emb.features, emb.paths, [], info).save(path)
        logger.debug("cached features in %s", path)
    return emb


def embed_labeled(
    model: nn.Module,
    data: Any,
    options: EmbedOptions | None = None,
    *,
    use_cache: bool = True,
    progress: Progress | None = None,
    **overrides: Any,
) -> tuple[torch.Tensor, np.ndarray, list[tuple[str, str]]]:
    """Embed a :class:`~dinokit.data.labeled.LabeledData` (cached).
    Returns ``(features (M, D), labels (M,), skipped [(path, reason)])`` where the M rows are the
    images that could be read, in data set order.
    """
    emb = cached_embed(model, data.images, options, use_cache=use_cache, data_fp=data.fingerprint(),
                       progress=progress, **overrides)
    if isinstance(data.images, np.ndarray):
        keep = np.asarray([int(n) for n in emb.paths], dtype=np.int64)
    else:
        pos = {str(p): i for i, p in enumerate(data.images)}
        keep = np.asarray([pos[n] for n in emb.paths], dtype=np.int64)
    return emb.features, data.labels[keep], list(emb.skipped)
