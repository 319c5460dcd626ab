"""FAISS image search: the index, its kinds, its store, metadata filters and contact sheets.

Modules: ``kinds`` (FAISS kind choice, knobs, memory per vector, building FAISS indexes), ``store``
(the on-disk store: SQLite + vector segments, the writer lock), ``search`` (k-NN over segments),
``metadata`` (metadata files, filters), ``folder`` (index folders, the version-1 format), ``index``
(:class:`Index`) and ``sheet`` (contact sheets).
"""

from dinokit.retrieval.index import AddResult, Index, ModelMismatchError, SearchResult, describe_model

__all__ = ["AddResult", "Index", "ModelMismatchError", "SearchResult", "describe_model"]
