"""dinokit: train, publish, evaluate and search with DINO self-supervised vision models.

Everything public is listed in ``__all__``. Names are imported lazily (PEP 562) so that
``import dinokit`` and ``dinokit --help`` stay fast and do not import torch, timm or faiss
until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # foundation: models, hub, embedding
    "load": "dinokit.hub",
    "save": "dinokit.hub",
    "list_models": "dinokit.models.registry",
    "embed": "dinokit.embedding",
    "Embeddings": "dinokit.embedding",
    "EmbedOptions": "dinokit.embedding",
    "load_embeddings": "dinokit.embedding",
    "iter_embeddings": "dinokit.embedding",
    # training
    "DINOHead": "dinokit.models.head",
    "DINOLoss": "dinokit.training.loss",
    "cosine_schedule": "dinokit.training.schedules",
    "TrainConfig": "dinokit.training.config",
    "train": "dinokit.training.loop",
    # evaluation
    "knn_classify": "dinokit.eval.knn",
    "linear_probe": "dinokit.eval.linear",
    # retrieval and attention
    "Index": "dinokit.retrieval.index",
    "SearchResult": "dinokit.retrieval.index",
    "last_selfattention": "dinokit.attention",
    "attention_maps": "dinokit.attention",
    # publishing
    "export": "dinokit.publish",
    "push": "dinokit.publish",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dinokit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from dinokit.attention import attention_maps, last_selfattention
    from dinokit.embedding import Embeddings, EmbedOptions, embed, iter_embeddings, load_embeddings
    from dinokit.eval.knn import knn_classify
    from dinokit.eval.linear import linear_probe
    from dinokit.hub import load, save
    from dinokit.models.head import DINOHead
    from dinokit.models.registry import list_models
    from dinokit.publish import export, push
    from dinokit.retrieval.index import Index, SearchResult
    from dinokit.training.config import TrainConfig
    from dinokit.training.loop import train
    from dinokit.training.loss import DINOLoss
    from dinokit.training.schedules import cosine_schedule
