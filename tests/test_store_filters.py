"""Metadata and equality filters: every result passes, and there are min(k, passing) of them, on every
kind, across the main index and small segments, with removed items; metadata files of each format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dinokit.retrieval import search as search_mod
from dinokit.retrieval.index import Index
from dinokit.retrieval.metadata import filter_query, matches, read_metadata_file

# tiny indexes: OpenMP threads only add spin-waiting on the shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_faiss_thread")

COLORS = ("red", "green", "blue", "black")




def _data(n: int, d: int = 24, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, d))
    x = (centers[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # skewed fields: some filters pass half the items, some a handful, some none
    meta = [{"color": COLORS[min(3, int(rng.exponential(0.8)))], "size": int(rng.integers(0, 5)),
             "sale": bool(rng.random() < 0.1)} for _ in range(n)]
    return x, meta


def _random_filter(rng: np.random.Generator) -> dict:
    choices = [("color", lambda: COLORS[rng.integers(0, 4)]), ("size", lambda: int(rng.integers(0, 6))),
               ("sale", lambda: bool(rng.random() < 0.5))]
    keys = rng.choice(len(choices), size=int(rng.integers(1, 3)), replace=False)
    return {choices[i][0]: choices[i][1]() for i in keys}


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_filters_are_exact(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # a low exact-scoring threshold sends large allowed sets through the FAISS selector path
    monkeypatch.setattr(search_mod, "EXACT_MAX", 50)
    x, meta = _data(3000)
    paths = [f"img/{i}.png" for i in range(len(x))]
    index = Index.from_features(x[:2400], paths[:2400], kind=kind, metadata=meta[:2400])
    for s in range(2400, 3000, 200):  # three small segments on top of the main index
        index.add(features=x[s:s + 200], paths=paths[s:s + 200], metadata=meta[s:s + 200])
    removed = set(range(0, 3000, 7))
    index.remove(sorted(removed))
    assert index.count == 3000 - len(removed) and index.info()["small_segments"] >= 1
    rng = np.random.default_rng(1)
    q = x[rng.integers(0, 3000, 6)] + 0.05
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for _ in range(25):
        flt, k = _random_filter(rng), int(rng.choice([1, 5, 10, 40, 300]))
        passing = [i for i in range(3000) if i not in removed and matches(meta[i], flt)]
        res = index.search_vectors(q, k=k, filter=flt)
        assert res.ids.shape == (len(q), min(k, len(passing))), (flt, k)
        for row_ids, row_meta in zip(res.ids, res.metadata, strict=True):
            assert len(set(row_ids)) == len(row_ids) and not set(row_ids.tolist()) & removed
            assert all(matches(m, flt) for m in row_meta), flt
        if kind == "flat" and passing:  # the exact kind returns exactly the best passing items
            sims = q @ x[passing].T
            best = np.sort(sims, axis=1)[:, ::-1][:, : min(k, len(passing))]
            np.testing.assert_allclose(res.scores, best, rtol=0, atol=1e-5)


def test_filter_equality_is_json_equality() -> None:
    x, _ = _data(6)
    meta = [{"n": 1}, {"n": 1.0}, {"n": "1"}, {"n": True}, {"n": None}, {"m": 1}]
    index = Index.from_features(x, [f"{i}" for i in range(6)], kind="flat", metadata=meta)

    def hits(flt: dict) -> list[int]:
        return sorted(index.search_vectors(x[0], k=6, filter=flt).ids[0].tolist())

    assert hits({"n": 1}) == [0, 1] and hits({"n": 1.0}) == [0, 1]
    assert hits({"n": "1"}) == [2] and hits({"n": True}) == [3] and hits({"n": None}) == [4]
    assert hits({"n": 1, "m": 1}) == [] and hits({"m": 1}) == [5]
    assert index.search_vectors(x[0], k=3, filter={"n": "nope"}).ids.shape == (1, 0)
    for i, m in enumerate(meta):  # the SQL and the Python twin agree
        for flt in ({"n": 1}, {"n": "1"}, {"n": True}, {"n": None}, {"m": 1}):
            assert matches(m, flt) == (i in hits(flt))
    with pytest.raises(ValueError, match="only strings, finite numbers, booleans and null"):
        filter_query({"n": [1, 2]})
    assert index.get(3) == {"id": 3, "path": "3", "metadata": {"n": True}}
    with pytest.raises(KeyError):
        index.get(99)


def test_metadata_files_csv_jsonl_parquet(tmp_path: Path) -> None:
    rows = [{"path": "a/1.png", "sku": "x1", "price": 3.5}, {"path": "/abs/b/2.png", "sku": "y2", "price": 7}]
    with (tmp_path / "m.csv").open("w") as f:
        f.write("path,sku,price\n" + "".join(f"{r['path']},{r['sku']},{r['price']}\n" for r in rows))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metadata_file(tmp_path / "m.csv")["a/1.png"] == {"sku": "x1", "price": "3.5"}  # CSV: strings
    assert read_metadata_file(tmp_path / "m.jsonl")["/abs/b/2.png"] == {"sku": "y2", "price": 7}
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    assert read_metadata_file(tmp_path / "m.parquet")["a/1.png"] == {"sku": "x1", "price": 3.5}
    # keyed by path: stored (relative to the root) or absolute paths both match
    x, _ = _data(3)
    index = Index.from_features(x, ["a/1.png", "/abs/b/2.png", "c.png"], kind="flat", root="/abs",
                                metadata=tmp_path / "m.jsonl")
    assert [index.get(i)["metadata"] for i in range(3)] == [{"sku": "x1", "price": 3.5}, {"sku": "y2", "price": 7}, {}]
    assert index.get(1)["path"] == "b/2.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not JSON"):
        read_metadata_file(bad)
    with pytest.raises(ValueError, match="has no 'path' value"):
        (tmp_path / "nopath.csv").write_text("sku\nx\n")
        read_metadata_file(tmp_path / "nopath.csv")
    with pytest.raises(ValueError, match="metadata has 2 entries for 3 items"):
        Index.from_features(x, ["p", "q", "r"], kind="flat", metadata=[{}, {}])


def test_search_by_id_get_resolve_roots(tmp_path: Path) -> None:
    x, meta = _data(50)
    index = Index.create(tmp_path / "idx", dim=x.shape[1], root=tmp_path / "photos")
    res = index.add(features=x, paths=[tmp_path / "photos" / f"{i}.png" for i in range(50)], metadata=meta)
    assert res.ids == list(range(50)) and res.skipped == []
    assert index.get(7)["path"] == "7.png" and index.resolve("7.png") == tmp_path / "photos" / "7.png"
    assert index.roots == [tmp_path / "photos"]
    hit = index.search_by_id(7, k=3)
    assert hit.ids[0, 0] == 7 and hit.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(index.vector(7), x[7], atol=1e-6)
    index.remove([7])
    with pytest.raises(KeyError):
        index.vector(7)
    again = Index.load(tmp_path / "idx")
    assert again.count == 49 and 7 not in again.search_by_id(8, k=49).ids
    row = again.search_by_id(8, k=2).to_list()[0]["results"][0]
    assert row == {"rank": 1, "id": 8, "path": "8.png", "score": pytest.approx(1.0, abs=1e-5), "metadata": meta[8]}
    assert "SearchResult(queries=1, k=2" in repr(again.search_by_id(8, k=2))
    # a store saved elsewhere is a complete, independent copy; stale temp folders of a killed save go
    stale = tmp_path / ".copy.tmp-dead"
    stale.mkdir()
    os.utime(stale, (0, 0))
    again.save(tmp_path / "copy")
    assert not stale.exists()
    copy = Index.load(tmp_path / "copy")
    assert copy.count == 49 and copy.get(8) == again.get(8) and copy.folder == tmp_path / "copy"
    copy.add(features=x[:1] * -1, paths=["other.png"])
    assert copy.count == 50 and again.count == 49


def test_threads_share_one_index_while_it_is_written(tmp_path: Path) -> None:
    """A server's threads: filtered searches (more distinct filters than the filter cache keeps) on
    one folder index while another thread adds items that no filter passes: every search is exact."""
    import threading

    x, meta = _data(600)
    index = Index.create(tmp_path / "idx", dim=x.shape[1], kind="flat")
    index.add(features=x, paths=[f"img/{i}.png" for i in range(600)], metadata=meta)
    filters = [{"size": s, "color": c} for s in range(5) for c in COLORS] + [{"size": s} for s in range(5)]
    filters += [{"color": c, "sale": b} for c in COLORS for b in (True, False)]
    assert len(filters) > 32  # past the cache size: entries are evicted while other threads read
    q = x[:3]
    want = {}
    for f in filters:
        res = index.search_vectors(q, k=8, filter=f)
        want[json.dumps(f)] = res.ids.tolist()
    errors: list[BaseException] = []

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(120):
                f = filters[int(rng.integers(len(filters)))]
                assert index.search_vectors(q, k=8, filter=f).ids.tolist() == want[json.dumps(f)], f
        except BaseException as e:  # reported below: an assert in a thread would pass silently
            errors.append(e)

    def writer() -> None:
        try:
            for j in range(10):
                y = _data(5, seed=100 + j)[0]
                index.add(features=y, paths=[f"new/{j}/{i}" for i in range(5)], metadata=[{"color": "none"}] * 5)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert index.count == 650
