"""The serve backend adapter: both implementations behind one interface.

``StoreBackend`` is checked against a small in-memory stand-in with the durable store's API (the real
store replaces it at merge time; the server tests then run on it too). ``LegacyBackend`` is checked
directly: its journal survives a restart, a torn last record is dropped, filters and deletes are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dinokit.serve import backend as be


@dataclass
class _Result:
    ids: np.ndarray
    paths: np.ndarray
    scores: np.ndarray
    metadata: np.ndarray


@dataclass
class _Added:
    ids: list[int]
    skipped: list[tuple[str, str]]


class FakeStore:
    """The durable store's API over numpy arrays (exact search, equality filters, deletes)."""

    refreshed = 0

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.x = np.zeros((0, 4), np.float32)
        self.paths: list[str] = []
        self.meta: list[dict[str, Any]] = []
        self.dead: set[int] = set()
        self.dim, self.kind, self.feature = 4, "flat", "cls"
        self.model_info = {"name": "m", "fingerprint": None, "source": "m", "image_size": 42}
        self.roots = [folder / "images"]

    @classmethod
    def load(cls, folder: Path, read_only: bool = False) -> FakeStore:
        return cls(Path(folder))

    @property
    def count(self) -> int:
        return len(self.paths) - len(self.dead)

    def add(self, *, features: np.ndarray, paths: list[str], metadata: list[dict[str, Any]]) -> _Added:
        start = len(self.paths)
        self.x = np.concatenate([self.x, features.astype(np.float32)])
        self.paths += list(paths)
        self.meta += list(metadata)
        return _Added(list(range(start, start + len(paths))), [])

    def remove(self, ids: list[int]) -> int:
        new = [i for i in ids if 0 <= i < len(self.paths) and i not in self.dead]
        self.dead.update(new)
        return len(new)

    def get(self, item_id: int) -> dict[str, Any]:
        if not 0 <= item_id < len(self.paths) or item_id in self.dead:
            raise KeyError(f"item {item_id}: not in the index")
        return {"id": item_id, "path": self.paths[item_id], "metadata": self.meta[item_id]}

    def resolve(self, path: str) -> Path:
        return self.roots[0] / path

    def vector(self, item_id: int) -> np.ndarray:
        return self.x[self.get(item_id)["id"]]

    def search_vectors(self, q: np.ndarray, k: int, *, filter: dict[str, Any] | None = None) -> _Result:
        n = len(q)
        out = _Result(np.full((n, k), -1, np.int64), np.full((n, k), None, object),
                      np.full((n, k), np.nan, np.float32), np.full((n, k), None, object))
        for r, s in enumerate(q @ self.x.T):
            keep = [i for i in np.argsort(-s) if i not in self.dead and be.matches(self.meta[i], filter)][:k]
            for c, i in enumerate(keep):
                out.ids[r, c], out.paths[r, c], out.scores[r, c], out.metadata[r, c] = i, self.paths[i], s[i], self.meta[i]
        return out

    def search_by_id(self, item_id: int, k: int, *, filter: dict[str, Any] | None = None) -> _Result:
        return self.search_vectors(self.vector(item_id)[None], k, filter=filter)

    def refresh(self) -> None:
        FakeStore.refreshed += 1


def test_store_backend_maps_the_store_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dinokit.retrieval.index as index_module

    monkeypatch.setattr(index_module, "Index", FakeStore)
    monkeypatch.setattr(be, "_REFRESH_EVERY_S", 0.0)
    (tmp_path / "images").mkdir()
    b = be.open_backend(tmp_path)
    assert isinstance(b, be.StoreBackend) and b.uploads.is_dir()
    x = np.eye(4, dtype=np.float32)
    ids, skipped = b.add(x, ["a.png", "b.png", "c.png", "d.png"], [{"s": 1}, {"s": 2}, {"s": 1}, {}])
    assert ids == [0, 1, 2, 3] and skipped == []
    assert b.info() == {"count": 4, "dim": 4, "kind": "flat", "model": FakeStore(tmp_path).model_info,
                        "feature": "cls"}
    hits = b.search_vectors(np.array([[0.9, 0.1, 0.3, 0.0]], np.float32), 2, None)[0]
    assert [h.id for h in hits] == [0, 2] and hits[0].path == "a.png" and hits[0].score == pytest.approx(0.9)
    assert [h.id for h in b.search_vectors(x[1:2], 4, {"s": 1})[0]] == [0, 2]
    assert [h.id for h in b.search_by_id(2, 1, None)] == [2]
    assert b.get(1) == {"id": 1, "path": "b.png", "metadata": {"s": 2}}
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    assert b.file_of(0) == (tmp_path / "images" / "a.png").resolve() and b.file_of(1) is None  # b.png is absent
    assert b.remove(1) and not b.remove(1)
    with pytest.raises(KeyError):
        b.get(1)
    assert b.count == 3 and FakeStore.refreshed >= 3


def _legacy(tmp_path: Path) -> Path:
    from dinokit.retrieval.index import Index

    rng = np.random.default_rng(0)
    Index.from_features(rng.normal(size=(20, 8)), [f"p{i}.png" for i in range(20)], "flat",
                        root=tmp_path / "images").save(tmp_path / "index")
    return tmp_path / "index"


def test_legacy_backend_journal_filters_deletes_and_torn_tail(tmp_path: Path) -> None:
    folder = _legacy(tmp_path)
    b = be.LegacyBackend(folder)
    rng = np.random.default_rng(1)
    new = rng.normal(size=(3, 8)).astype(np.float32)
    files = [str(b.uploads / f"u{i}.png") for i in range(3)]
    ids, _ = b.add(new, files, [{"sku": "a"}, {"sku": "b"}, {"sku": "a"}])
    assert ids == [20, 21, 22]
    assert b.get(21) == {"id": 21, "path": "files/u1.png", "metadata": {"sku": "b"}}
    assert [h.id for h in b.search_vectors(new[1:2], 5, {"sku": "a"})[0]] in ([20, 22], [22, 20])
    assert b.remove(20)
    with pytest.raises(KeyError):
        b.remove(20)
    assert [h.id for h in b.search_vectors(new[0:1], 30, None)[0]].count(20) == 0
    assert len(b.search_vectors(new[0:1], 30, None)[0]) == 22
    # a restart replays the journal; a torn last line (a write never acknowledged) is cut off
    with open(b.uploads / be.JOURNAL, "ab") as f:
        f.write(b'{"op":"add","ids":[23]')
    again = be.LegacyBackend(folder)
    assert again.count == 22 and again.get(22)["metadata"] == {"sku": "a"}
    with pytest.raises(KeyError):
        again.get(20)
    assert (b.uploads / be.JOURNAL).read_bytes().endswith(b"\n")
    np.testing.assert_allclose(again.index.vectors([files[2]])[0], new[2] / np.linalg.norm(new[2]), atol=1e-6)
    with pytest.raises(ValueError, match="already in the index"):
        again.add(new[:1], files[:1], [{}])


def test_inside_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"s")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "dirlink").symlink_to(tmp_path)
    assert be.inside(root / "sub" / "ok.png", [root]) == (root / "sub" / "ok.png").resolve()
    for bad in (root / ".." / "secret.png", root / "link.png", root / "dirlink" / "secret.png",
                tmp_path / "secret.png", root / "sub", root / "missing.png"):
        assert be.inside(bad, [root]) is None, bad
