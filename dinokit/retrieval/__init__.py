"""FAISS image search: the index, its kinds, its store, metadata filters and contact sheets.

Modules: ``kinds`` (FAISS kind choice, knobs, memory per vector, building FAISS indexes), ``store``
(the on-disk store: SQLite + vector segments, the writer lock), ``search`` (k-NN over segments),
``metadata`` (metadata files, filters), ``folder`` (index folders, the version-1 format), ``index``
(:class:`Index`) and ``sheet`` (contact sheets). Names are re-exported lazily (PEP 562) so that
importing ``dinokit.retrieval.store`` alone does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["AddResult", "Index", "ModelMismatchError", "SearchResult", "describe_model"]
_EXPORTS = dict.fromkeys(__all__, "dinokit.retrieval.index")


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dinokit.retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from dinokit.retrieval.index import AddResult, Index, ModelMismatchError, SearchResult, describe_model
