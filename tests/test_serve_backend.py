"""The serve backend over the real index store (no HTTP): ids, metadata, filters, paths shown to
clients, which files may be served, other writers' commits, old-format folders (read-only) and the
background compaction."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from dinokit.retrieval.index import Index
from dinokit.serve import backend as be

DIM = 8
MODEL_INFO = {"name": "m", "source": "/models/m", "fingerprint": "fp"}


def _unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _store(tmp_path: Path) -> tuple[Path, Path]:
    """An empty flat store whose root is ``tmp_path/images`` (with a.png, b.png, c.png in it)."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        Image.new("L", (4, 4), 100).save(images / f"{name}.png")
    folder = tmp_path / "index"
    Index.create(folder, dim=DIM, kind="flat", model_info=MODEL_INFO, image_size=42, root=images)
    return folder, images


def test_backend_maps_the_store(tmp_path: Path) -> None:
    folder, images = _store(tmp_path)
    b = be.Backend(folder)
    assert not b.read_only and b.uploads == folder / "files" and b.uploads.is_dir()
    assert b.info() == {"count": 0, "dim": DIM, "kind": "flat", "model": MODEL_INFO, "feature": "cls"}
    assert b.image_size == 42
    x = _unit(4, 0)
    upload = b.uploads / "u1_bag.png"
    Image.new("L", (4, 4), 7).save(upload)
    paths = [str(images / "a.png"), str(images / "b.png"), str(images / "c.png"), str(upload)]
    ids, skipped = b.add(x, paths, [{"s": 1}, {"s": 2}, {"s": 1}, {}])
    assert ids == [0, 1, 2, 3] and skipped == []
    again, skipped = b.add(x[:1], paths[:1], [{}])
    assert again == [] and skipped == [("a.png", "already in the index")]
    assert b.count == 4
    hits = b.search_vectors(x[:1], 2, None)[0]
    assert hits[0] == be.Hit(0, "a.png", pytest.approx(1.0, abs=1e-6), {"s": 1})
    assert len(hits) == 2 and hits[1].score < hits[0].score
    assert [h.id for h in b.search_vectors(x[1:2], 4, {"s": 1})[0]] in ([0, 2], [2, 0])
    assert [h.id for h in b.search_by_id(2, 1, None)] == [2]
    assert b.search_by_id(3, 1, None)[0].path == "files/u1_bag.png"  # not the server's own path
    assert b.get(1) == {"id": 1, "path": "b.png", "metadata": {"s": 2}}
    assert b.get(3) == {"id": 3, "path": "files/u1_bag.png", "metadata": {}}
    assert b.file_of(0) == (images / "a.png").resolve() and b.file_of(3) == upload.resolve()
    (images / "b.png").unlink()
    assert b.file_of(1) is None
    b.remove(1)
    for call in (b.get, b.remove, b.file_of, lambda i: b.search_by_id(i, 1, None)):
        with pytest.raises(KeyError):
            call(1)
    with pytest.raises(KeyError):
        b.get(99)
    assert b.count == 3 and 1 not in [h.id for h in b.search_vectors(x[1:2], 10, None)[0]]


def test_backend_sees_other_writers_and_restarts(tmp_path: Path) -> None:
    folder, images = _store(tmp_path)
    b = be.Backend(folder)
    ids, _ = b.add(_unit(2, 1), [str(images / "a.png"), str(images / "b.png")], [{"w": "server"}] * 2)
    other = Index.load(folder)  # another writer on the same folder (as `dinokit index add` would be)
    y = _unit(3, 2)
    theirs = other.add(features=y, paths=["x/1.png", "x/2.png", "x/3.png"], metadata=[{"w": "cli"}] * 3).ids
    other.remove([ids[0]])
    assert b.count == 4  # no restart needed
    assert [h.id for h in b.search_vectors(y[2:3], 1, {"w": "cli"})[0]] == [theirs[2]]
    with pytest.raises(KeyError):
        b.get(ids[0])
    mine, _ = b.add(_unit(1, 3), [str(images / "c.png")], [{"w": "server"}])
    assert not set(mine) & set(theirs) and not set(mine) & set(ids)
    restarted = be.Backend(folder)
    assert restarted.count == 5 and restarted.get(mine[0])["metadata"] == {"w": "server"}


def _write_v1(folder: Path, x: np.ndarray, paths: list[str], root: Path) -> None:
    """A folder of the old format (index.faiss + meta.json + paths.json)."""
    folder.mkdir()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    faiss.write_index(index, str(folder / "index.faiss"))
    (folder / "paths.json").write_text(json.dumps(paths))
    meta = {"format_version": 1, "kind": "flat", "knobs": {}, "count": len(paths), "dim": x.shape[1],
            "feature_kind": "cls", "image_size": 42, "root": str(root), "model": MODEL_INFO,
            "model_source": "/models/m", "metric": "inner_product"}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_old_format_folder_is_served_read_only(tmp_path: Path) -> None:
    _, images = _store(tmp_path)
    x = _unit(3, 4)
    _write_v1(tmp_path / "old", x, ["a.png", "b.png", "c.png"], images)
    b = be.Backend(tmp_path / "old")
    assert b.read_only and not b.uploads.exists() and b.count == 3 and b.image_size == 42
    assert [h.id for h in b.search_vectors(x[1:2], 1, None)[0]] == [1]
    assert b.file_of(2) == (images / "c.png").resolve()
    with pytest.raises(be.ReadOnlyIndexError, match=r"dinokit index migrate .*old"):
        b.check_writable()
    with pytest.raises(be.ReadOnlyIndexError):
        b.add(x[:1], [str(images / "a2.png")], [{}])
    with pytest.raises(be.ReadOnlyIndexError):
        b.remove(0)
    assert b.count == 3


def test_writes_compact_in_the_background(tmp_path: Path) -> None:
    folder, _ = _store(tmp_path)
    b = be.Backend(folder)
    x = _unit(8, 5)
    ids, _ = b.add(x, [f"p{i}.png" for i in range(8)], [{"i": i} for i in range(8)])
    assert b._compactor is None  # nothing to fold yet
    for i in ids[:3]:  # 3 of 8 stored vectors deleted: over the quarter that makes compaction pay off
        b.remove(i)
    assert b._compactor is not None
    b._compactor.join(timeout=30)
    assert not b._compactor.is_alive()
    info = b.index.info()
    assert info["ntotal"] == info["count"] == 5 and info["small_segments"] == 0 and info["removed_pending"] == 0
    assert [h.id for h in b.search_vectors(x[5:6], 1, None)[0]] == [5]
    assert [h.id for h in b.search_vectors(x[0:1], 5, None)[0]] != [] and 0 not in \
        [h.id for h in b.search_vectors(x[0:1], 5, None)[0]]


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


def test_item_rows_are_remembered_per_snapshot_and_handed_out_as_copies(tmp_path: Path) -> None:
    folder, images = _store(tmp_path)
    b = be.Backend(folder)
    x = _unit(3, 3)
    b.add(x, [str(images / n) for n in ("a.png", "b.png", "c.png")], [{"s": 1}, {"s": 2}, {"s": 3}])
    first = b.search_vectors(x[:1], 3, None)[0]
    assert first[0].id == 0 and first[0].metadata == {"s": 1}
    first[0].metadata["s"] = 99  # a caller's change must not reach the remembered row
    again = b.search_vectors(x[:1], 3, None)[0]
    assert {h.id: h.metadata["s"] for h in again} == {0: 1, 1: 2, 2: 3}
    memo = b.index._store.snapshot().memo["items"]
    assert set(memo) == {0, 1, 2}
    b.remove(1)  # a commit: the next search reads a new snapshot with its own memo
    assert [h.id for h in b.search_vectors(x[1:2], 3, None)[0]] in ([0, 2], [2, 0])
    assert b.index._store.snapshot().memo.get("items") is not memo  # (a background compaction may commit too)


def test_fastjson_matches_the_standard_library() -> None:
    from dinokit.serve import fastjson

    hits = [be.Hit(3, "a/b.png", 0.8097615242004395, {"é": [1, 2]}), be.Hit(4, None, -0.5, {})]
    want = json.dumps({"results": [{"id": 3, "path": "a/b.png", "score": 0.8097615242004395, "metadata": {"é": [1, 2]}},
                                   {"id": 4, "path": None, "score": -0.5, "metadata": {}}], "took_ms": 1.25},
                      ensure_ascii=False, separators=(",", ":")).encode()
    assert fastjson.dumps({"results": hits, "took_ms": 1.25}) == want
    assert fastjson.dumps({"big": 2**70}) == b'{"big":1180591620717411303424}'  # orjson refuses: the fallback writes it
    assert fastjson.loads(b'{"id": 1180591620717411303424, "v": [NaN]}')["id"] == 2**70  # what json reads, read
    with pytest.raises(json.JSONDecodeError):
        fastjson.loads(b'{"vector": [1, 2')
    with pytest.raises(UnicodeDecodeError):
        fastjson.loads(b'{"a": "\xff"}')
