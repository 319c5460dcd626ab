"""dinokit: train, publish, evaluate and search with DINO self-supervised vision models.

Everything public is listed in ``__all__``. Names are imported lazily (PEP 562) so that
``import dinokit`` and ``dinokit --help`` stay fast and do not import torch, timm or faiss
until they are needed.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # foundation: models, hub, embedding
    "load": "dinokit.hub",
    "save": "dinokit.hub",
    "list_models": "dinokit.models.registry",
    "embed": "dinokit.embed",
    "Embeddings": "dinokit.embed",
    # training
    "DINOHead": "dinokit.models.head",
    "DINOLoss": "dinokit.train.loss",
    "cosine_schedule": "dinokit.train.schedules",
    "TrainConfig": "dinokit.train.config",
    "train": "dinokit.train.loop",
    # evaluation
    "knn_classify": "dinokit.eval.knn",
    "linear_probe": "dinokit.eval.linear",
    # retrieval and attention
    "Index": "dinokit.retrieval",
    "SearchResult": "dinokit.retrieval",
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


# Two public functions share their name with the submodule that defines them (``dinokit.embed`` in
# embed.py, ``dinokit.train`` in train/). Importing such a submodule makes the import system set it
# as an attribute of this package, which would replace the function: ``dinokit.embed(model, x)``
# would then fail with "'module' object is not callable" depending on import order. The package
# therefore refuses to let those submodules shadow the functions. Reach the submodules with
# ``from dinokit.embed import Embeddings`` or ``from dinokit.train import loop`` (these read
# sys.modules); ``import dinokit.embed as m`` would bind the function, so do not use that form.
_FUNCTION_NAMES = frozenset({"embed", "train"})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTION_NAMES and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable through sys.modules and "from ... import"
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from dinokit.attention import attention_maps, last_selfattention
    from dinokit.embed import Embeddings, embed
    from dinokit.eval.knn import knn_classify
    from dinokit.eval.linear import linear_probe
    from dinokit.hub import load, save
    from dinokit.models.head import DINOHead
    from dinokit.models.registry import list_models
    from dinokit.publish import export, push
    from dinokit.retrieval import Index, SearchResult
    from dinokit.train.config import TrainConfig
    from dinokit.train.loop import train
    from dinokit.train.loss import DINOLoss
    from dinokit.train.schedules import cosine_schedule
