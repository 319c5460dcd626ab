"""``dinokit.Client``: the HTTP API of ``dinokit serve`` from Python.

>>> client = dinokit.Client("http://127.0.0.1:8000", token=None)
>>> res = client.search("query.jpg", k=5)            # or a PIL image, bytes, a vector, an item id
>>> res.paths[0], res.scores[0], res.ids[0]          # each (n_queries=1, k), like Index.search
>>> client.add(["a.jpg", "b.jpg"], metadata=[{"sku": "a"}, {"sku": "b"}]).ids

Only httpx is imported (no torch, FastAPI or FAISS), so an app can call a server cheaply.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # annotations only: the client stays light (no torch, PIL or faiss at import)
    from typing import TypeAlias

    import torch
    from PIL import Image

    from dinokit.retrieval.index import SearchResult

    #: what :meth:`Client.search` accepts: an item id, a vector (D,), an image path, a PIL image, image bytes
    Query: TypeAlias = (int | np.integer | Sequence[float] | np.ndarray | torch.Tensor
                        | str | os.PathLike[str] | Image.Image | bytes)


class ServerError(RuntimeError):
    """The server answered with an error: ``status`` and its one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class AddResult:
    """Ids of the added images (in the order of the accepted files) and (name, reason) of skipped ones."""

    ids: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)


class Client:
    """A client of one ``dinokit serve`` server; ``token`` is sent as ``Authorization: Bearer`` on writes."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.token = token
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r}, token={'***' if self.token else None})"

    # ------------------------------------------------------------------ transport

    def _call(self, method: str, path: str, *, write: bool = False, **kw: Any) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if write and self.token else {}
        try:
            r = self._http.request(method, path, headers=headers, **kw)
        except httpx.TransportError as e:
            raise ConnectionError(f"{self.url}: cannot reach the server ({type(e).__name__}: {e})") from e
        if r.status_code >= 400:
            try:
                message = r.json().get("error", r.text)
            except (ValueError, AttributeError):
                message = r.text.strip() or r.reason_phrase
            if r.status_code == 404:
                raise KeyError(message)
            raise ServerError(r.status_code, message)
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.content

    # ------------------------------------------------------------------ API

    def search(self, query: Query, k: int = 10, filter: dict[str, Any] | None = None, *,
               box: Sequence[float] | None = None) -> SearchResult:
        """The ``k`` nearest items to ``query``: an image path, a PIL image, image bytes, a vector (D,)
        (list, numpy or torch) or an item id (int). ``box`` = [x0, y0, x1, y1] searches an image region.

        Returns a :class:`dinokit.SearchResult` with one row (``paths``, ``scores``, ``ids`` of shape
        (1, k); missing places: path None, score NaN, id -1) and the items' metadata when it has that field.
        """
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            body = self._call("POST", "/search", json={"id": int(query), "k": k, "filter": filter})
        elif _is_vector(query):
            vec = _vector(query)
            body = self._call("POST", "/search", json={"vector": vec.reshape(-1).tolist(), "k": k, "filter": filter})
        else:
            name, data = _image_bytes(query)
            form: dict[str, str] = {"k": str(k)}
            if filter:
                form["filter"] = json.dumps(filter)
            if box is not None:
                form["box"] = json.dumps([float(v) for v in box])
            body = self._call("POST", "/search", files={"file": (name, data)}, data=form)
        return _search_result(body["results"], k, str(query) if isinstance(query, (str, os.PathLike)) else "query")

    def add(self, paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
            metadata: Sequence[dict[str, Any]] | None = None) -> AddResult:
        """Upload image files (with one metadata dict each); returns once the server has them durably."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if metadata is not None and len(metadata) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(metadata)} metadata entries")
        files = [("files", (Path(p).name, Path(p).read_bytes())) for p in paths]
        data = {"metadata": json.dumps(list(metadata))} if metadata is not None else None
        body = self._call("POST", "/items", write=True, files=files, data=data)
        return AddResult([int(i) for i in body["ids"]], [(s["name"], s["reason"]) for s in body["skipped"]])

    def remove(self, item_id: int) -> int:
        """Delete an item; KeyError when it is unknown."""
        return int(self._call("DELETE", f"/items/{int(item_id)}", write=True)["deleted"])

    def get(self, item_id: int) -> dict[str, Any]:
        """``{"id", "path", "metadata"}`` of an item; KeyError when unknown or deleted."""
        return dict(self._call("GET", f"/items/{int(item_id)}"))

    def image(self, item_id: int) -> bytes:
        """The stored image file of an item."""
        return bytes(self._call("GET", f"/items/{int(item_id)}/image"))

    def info(self) -> dict[str, Any]:
        """``{"count", "dim", "kind", "model", "feature"}``."""
        return dict(self._call("GET", "/info"))


def _is_vector(query: Any) -> bool:
    if hasattr(query, "detach") and hasattr(query, "shape"):  # a torch tensor
        return True
    if isinstance(query, np.ndarray):
        return query.dtype != np.uint8 or query.ndim == 1
    return isinstance(query, (list, tuple)) and all(isinstance(v, (int, float)) for v in query)


def _vector(query: Any) -> np.ndarray:
    """A vector query (list, numpy or torch) as float32 numpy."""
    return np.asarray(query.detach().cpu() if hasattr(query, "detach") else query, dtype=np.float32)


def _image_bytes(query: Any) -> tuple[str, bytes]:
    """(file name, encoded bytes) of an image path, a PIL image or raw image bytes."""
    if isinstance(query, (bytes, bytearray, memoryview)):
        return "query", bytes(query)
    if isinstance(query, (str, os.PathLike)):
        path = Path(query)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        return path.name, path.read_bytes()
    if hasattr(query, "save") and hasattr(query, "size"):  # a PIL image: send it losslessly
        buf = io.BytesIO()
        query.save(buf, format="PNG")
        return "query.png", buf.getvalue()
    raise TypeError(f"search query: expected an image path, PIL image, bytes, vector or item id, "
                    f"got {type(query).__name__}")


def _search_result(results: list[dict[str, Any]], k: int, name: str) -> SearchResult:
    """Server results -> a one-row SearchResult padded to ``k``, with metadata where SearchResult has it."""
    from dinokit.retrieval.index import SearchResult

    ids = np.full((1, k), -1, np.int64)
    scores = np.full((1, k), np.nan, np.float32)
    paths = np.full((1, k), None, object)
    meta = np.full((1, k), None, object)
    for j, r in enumerate(results[:k]):
        ids[0, j], scores[0, j], paths[0, j], meta[0, j] = r["id"], r["score"], r["path"], r.get("metadata", {})
    kw: dict[str, Any] = {"paths": paths, "scores": scores, "ids": ids}
    names = {f.name for f in fields(SearchResult)}
    if "metadata" in names:
        kw["metadata"] = meta
    if "query_names" in names:
        kw["query_names"] = [name]
    return SearchResult(**kw)
