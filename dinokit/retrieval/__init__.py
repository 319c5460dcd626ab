"""FAISS image search: the index, its kinds, its store and contact sheets."""

from dinokit.retrieval.index import Index, SearchResult

__all__ = ["Index", "SearchResult"]
