"""Indexes from sharded feature folders: streamed build, disk re-rank, on-disk lists, merge, CLI, kills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dinokit._io import write_json
from dinokit.cli import app
from dinokit.retrieval.index import Index
from dinokit.retrieval.kinds import faiss
from dinokit.retrieval.stream import merge_indexes, parse_size
from dinokit.shards import plan_shards, write_shard

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

MODEL = {"model": "dino_vits16", "arch": "vit_small_patch16_224", "fingerprint": "f00d"}


def clustered(n: int, dim: int = 32, centres: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``centres`` random directions (retrieval-like: neighbours are meaningful)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def paths_of(n: int, start: int = 0) -> list[str]:
    return [f"img/{i:06d}.jpg" for i in range(start, start + n)]


def feature_folder(folder: Path, x: np.ndarray, shard_size: int, *, fmt: str = "npy", start: int = 0,
                   model: dict[str, str] | None = None) -> Path:
    """A complete sharded feature folder of ``x`` as `dinokit embed --out` writes it (shop metadata column)."""
    folder.mkdir(parents=True)
    plan = plan_shards(len(x), shard_size)
    paths = paths_of(len(x), start)
    records = [write_shard(folder, i, len(plan), (a, b), x[a:b], paths[a:b], {"shop": [j % 3 for j in range(a, b)]},
                           [], fmt) for i, (a, b) in enumerate(plan)]
    write_json(folder / "manifest.json", {
        "format_version": 1, "inputs": {"kind": "list", "spec": "list.txt", "count": len(x)},
        "model": model or MODEL, "preprocessing": {"crop_size": 224}, "features": "cls",
        "feature_shape": [x.shape[1]], "dtype": "float32", "format": fmt, "shard_size": shard_size,
        "status": "complete", "world_size": 1, "rows": len(x), "skipped": [], "shards": records})
    return folder


def recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(a[i]) & set(b[i])) / b.shape[1] for i in range(len(a))]))


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(3000)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(60, seed=7)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_exact_kinds_same_neighbours_as_in_memory(tmp_path: Path, data: np.ndarray, queries: np.ndarray,
                                                  kind: str) -> None:
    feats = feature_folder(tmp_path / "feats", data, 700, fmt="parquet" if kind == "flat" else "npy")
    idx = Index.from_shards(feats, tmp_path / "idx", kind=kind)
    ref = Index.from_features(data, paths_of(len(data)), kind=kind)
    got, want = idx.search_vectors(queries, 10), ref.search_vectors(queries, 10)
    assert np.array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    assert (got.paths == want.paths).all()
    # ids are the rows' global numbers (row_offset + row), the model and feature kind come from the manifest
    assert idx.id_of("img/002100.jpg") == 2100
    np.testing.assert_allclose(idx.vector(2100), data[2100], rtol=1e-6)
    assert idx.model_info is not None and idx.model_info["fingerprint"] == "f00d"
    assert (idx.feature, idx.image_size, len(idx)) == ("cls", 224, 3000)
    # the shards' metadata columns are filterable
    res = idx.search_vectors(queries[:5], 20, filter={"shop": 2})
    assert (res.ids % 3 == 2).all() and res.metadata[0, 0] == {"shop": 2}


def test_metadata_file_adds_to_the_shard_columns(tmp_path: Path, data: np.ndarray) -> None:
    feats = feature_folder(tmp_path / "feats", data[:200], 100)
    (tmp_path / "extra.jsonl").write_text('{"path": "img/000005.jpg", "sku": "x"}\n')
    idx = Index.from_shards(feats, tmp_path / "idx", metadata=tmp_path / "extra.jsonl")
    assert idx.get(5)["metadata"] == {"shop": 2, "sku": "x"} and idx.get(6)["metadata"] == {"shop": 0}
    assert idx.search_vectors(data[:3], 5, filter={"sku": "x"}).ids[:, 0].tolist() == [5, 5, 5]


def test_ivfpq_disk_rerank_matches_flat_rerank(tmp_path: Path, data: np.ndarray, queries: np.ndarray) -> None:
    feats = feature_folder(tmp_path / "feats", data, 500)
    idx = Index.from_shards(feats, tmp_path / "idx", kind="ivfpq", refine="disk", nlist=16)
    ref = Index.from_features(data, paths_of(len(data)), kind="ivfpq", nlist=16)
    exact = Index.from_features(data, paths_of(len(data)), kind="flat").search_vectors(queries, 10)
    got, want = idx.search_vectors(queries, 10), ref.search_vectors(queries, 10)
    assert idx.knobs["refine"] == "disk"
    assert np.array_equal(got.ids[:, 0], want.ids[:, 0])
    assert recall(got.ids, want.ids) >= 0.95 and recall(got.ids, exact.ids) >= 0.95
    # the re-rank is exact: scores are the true cosine similarities of the returned items
    np.testing.assert_allclose(got.scores, np.einsum("qd,qkd->qk", queries, data[got.ids]), rtol=1e-5)
    # the FAISS index holds codes only (no refine copy of the vectors)
    main = idx._store.snapshot().segments[0]
    assert type(faiss.downcast_index(main.index)).__name__ == "IndexIVFPQFastScan"
    # removals and adds keep working; compaction folds them in
    idx.remove([int(got.ids[0, 0])], compact=False)
    assert int(got.ids[0, 0]) not in idx.search_vectors(queries[:1], 10).ids
    idx.add(features=queries[:3], paths=["new/a.jpg", "new/b.jpg", "new/c.jpg"])
    assert idx.search_vectors(queries[:3], 1).paths[:, 0].tolist() == ["new/a.jpg", "new/b.jpg", "new/c.jpg"]
    idx.compact()
    assert len(idx) == 3002 and idx.search_vectors(queries[1:2], 1).paths[0, 0] == "new/b.jpg"


def test_tiny_budget_puts_inverted_lists_on_disk(tmp_path: Path, data: np.ndarray, queries: np.ndarray) -> None:
    feats = feature_folder(tmp_path / "feats", data, 1000)
    Index.from_shards(feats, tmp_path / "idx", kind="ivfpq", memory_budget="20KB", nlist=16)  # 3000 x 12 B > 20 KB
    (tmp_path / "idx").rename(tmp_path / "moved")  # the .ivfdata file is found beside the index file
    idx = Index.load(tmp_path / "moved")
    assert idx.knobs["ondisk"] == 1 and idx.knobs["refine"] == "disk"
    assert len(list((tmp_path / "moved").glob("main-*.ivfdata"))) == 1
    assert idx.info()["bytes_per_vector"] == 0.0 and idx.info()["memory_budget"] == 20 * 2**10
    exact = Index.from_features(data, paths_of(len(data)), kind="flat").search_vectors(queries, 10)
    got = idx.search_vectors(queries, 10)
    assert np.array_equal(got.ids[:, 0], exact.ids[:, 0]) and recall(got.ids, exact.ids) >= 0.95


def test_merge_of_disjoint_halves_equals_the_whole(tmp_path: Path, data: np.ndarray, queries: np.ndarray) -> None:
    feats = feature_folder(tmp_path / "feats", data, 500)
    for name, shards in (("a", (0, 3)), ("b", (3, 6))):
        Index.from_shards(feats, tmp_path / name, kind="flat", shards=shards)
    merged = Index.merge([tmp_path / "b", tmp_path / "a"], tmp_path / "m")  # any input order
    whole = Index.from_features(data, paths_of(len(data)), kind="flat")
    got, want = merged.search_vectors(queries, 10), whole.search_vectors(queries, 10)
    assert np.array_equal(got.ids, want.ids) and (got.paths == want.paths).all()
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    assert merged.get(2999) == {"id": 2999, "path": "img/002999.jpg", "metadata": {"shop": 2}}


def test_merge_with_shared_quantizers_concatenates_lists(tmp_path: Path, data: np.ndarray,
                                                         queries: np.ndarray) -> None:
    feats = feature_folder(tmp_path / "feats", data, 500)
    Index.from_shards(feats, tmp_path / "t", kind="ivfpq", refine="disk", nlist=16)
    for name, shards in (("a", (0, 2)), ("b", (2, 6))):
        Index.from_shards(feats, tmp_path / name, shards=shards, trained_from=tmp_path / "t")  # its knobs
    merged = Index.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    # the same codes in the same lists as the index of the whole: the same results
    got, want = merged.search_vectors(queries, 10), Index.load(tmp_path / "t").search_vectors(queries, 10)
    assert np.array_equal(got.ids, want.ids)


def test_merge_renumbers_overlapping_ids_and_rejects_bad_inputs(tmp_path: Path, data: np.ndarray) -> None:
    a = feature_folder(tmp_path / "fa", data[:800], 400)
    b = feature_folder(tmp_path / "fb", data[800:1600], 400, start=800)  # its own job: ids 0.. again
    Index.from_shards(a, tmp_path / "a", kind="flat")
    Index.from_shards(b, tmp_path / "b", kind="flat")
    told: list[str] = []
    merge_indexes([tmp_path / "a", tmp_path / "b"], tmp_path / "m", on_renumber=told.append)
    m = Index.load(tmp_path / "m")
    assert told and len(m) == 1600 and m.id_of("img/000900.jpg") == 900
    np.testing.assert_allclose(m.vector(900), data[900], rtol=1e-6)
    with pytest.raises(ValueError, match=r"img/000000.jpg: live in both"):
        merge_indexes([tmp_path / "a", tmp_path / "m"], tmp_path / "x")
    other = feature_folder(tmp_path / "fc", clustered(100, dim=16), 50, start=5000)
    Index.from_shards(other, tmp_path / "c", kind="flat")
    with pytest.raises(ValueError, match=r"c: dimension 16"):
        merge_indexes([tmp_path / "a", tmp_path / "c"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_parse_size_and_errors(tmp_path: Path, data: np.ndarray) -> None:
    assert parse_size("4GB") == 4 * 2**30 and parse_size("300kb") == 300 * 2**10 and parse_size("1.5G") == 3 * 2**29
    for bad in ("4XB", "-1GB", "GB", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_size(bad)
    feats = feature_folder(tmp_path / "feats", data[:100], 50)
    with pytest.raises(ValueError, match="shards 0:5"):
        Index.from_shards(feats, tmp_path / "i", shards=(0, 5))
    bad = data[:100].copy()
    bad[70, 3] = np.nan  # in the second shard: named, and no index folder is left behind
    feats = feature_folder(tmp_path / "nan", bad, 50)
    with pytest.raises(ValueError, match=r"nan: shard 1: features contain NaN or infinite values"):
        Index.from_shards(feats, tmp_path / "j")
    assert not (tmp_path / "j").exists()


def test_cli_build_from_features_and_merge(tmp_path: Path, data: np.ndarray) -> None:
    feats = feature_folder(tmp_path / "feats", data[:1200], 300)
    runner = CliRunner()
    for name, shards in (("a", "0:2"), ("b", "2:4")):
        res = runner.invoke(app, ["index", "build", "--features", str(feats), "--out", str(tmp_path / name),
                                  "--memory-budget", "64MB", "--shards", shards, "--json"])
        assert res.exit_code == 0, res.output
        info = json.loads(res.stdout)
        assert info["count"] == 600 and info["kind"] == "flat"
    res = runner.invoke(app, ["index", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                              str(tmp_path / "m"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["count"] == 1200
    assert Index.load(tmp_path / "m").search_vectors(data[700], 1).ids[0, 0] == 700
    # on-disk lists: faiss's printf notices must not reach stdout (--json stays parseable)
    cmd = [sys.executable, "-m", "dinokit.cli", "index", "build", "--features", str(feats), "--out",
           str(tmp_path / "od"), "--kind", "ivfpq", "--knob", "nlist=8", "--memory-budget", "4KB", "--json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["knobs"]["ondisk"] == 1 and "resizing" in done.stderr
    res = runner.invoke(app, ["index", "build", "--features", str(feats), "--out", str(tmp_path / "x"),
                              "--memory-budget", "lots"])
    assert res.exit_code != 0 and "--memory-budget" in res.output


@pytest.mark.parametrize("point", ["index:shard-written#2", "index:chunk-added", "folder:ready"])
def test_killed_build_leaves_no_folder_or_the_old_one(tmp_path: Path, data: np.ndarray, point: str) -> None:
    feats = feature_folder(tmp_path / "feats", data[:1500], 500)
    out = tmp_path / "idx"
    script = ("import sys; from dinokit.retrieval.stream import build_from_shards; "
              "build_from_shards(sys.argv[1], sys.argv[2], kind=sys.argv[3], nlist=8)")
    env = {**os.environ, "DINOKIT_CRASH_AT": point, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-c", script, str(feats), str(out)]
    assert subprocess.run([*run, "ivfpq"], env=env).returncode == -9
    assert not out.exists()
    Index.from_shards(feats, out, kind="flat")  # an old index, then a killed rebuild of another kind
    assert subprocess.run([*run, "ivfpq"], env=env).returncode == -9
    idx = Index.load(out)
    assert idx.kind == "flat" and len(idx) == 1500
    assert idx.search_vectors(data[3], 1).ids[0, 0] == 3


def test_merge_of_separately_trained_parts_re_encodes(tmp_path: Path, data: np.ndarray, queries: np.ndarray) -> None:
    feats = feature_folder(tmp_path / "feats", data, 500)
    Index.from_shards(feats, tmp_path / "a", kind="ivfpq", refine="disk", nlist=16, shards=(0, 3))
    Index.from_shards(feats, tmp_path / "b", kind="ivfpq", refine="disk", nlist=8, shards=(3, 6))
    merged = Index.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert merged.knobs["nlist"] == 16 and merged.ntotal == 3000  # the first part's quantizers, every vector
    exact = Index.from_features(data, paths_of(len(data)), kind="flat").search_vectors(queries, 10)
    got = merged.search_vectors(queries, 10)
    assert recall(got.ids, exact.ids) >= 0.9  # codebooks trained on half the data: a little coarser
    # every vector is there under its id: re-ranking every candidate list gives the exact answer
    assert np.array_equal(merged.search_vectors(queries, 10, k_factor=300).ids, exact.ids)


def test_merge_carries_adds_and_drops_removed_items(tmp_path: Path, data: np.ndarray, queries: np.ndarray) -> None:
    feats = feature_folder(tmp_path / "feats", data, 500)
    a = Index.from_shards(feats, tmp_path / "a", kind="flat", shards=(0, 3))
    Index.from_shards(feats, tmp_path / "b", kind="flat", shards=(3, 6))
    a.remove([5], compact=False)
    a.add(features=queries[:1], paths=["new/q0.jpg"], metadata=[{"shop": 9}])  # id 1500: b has one too
    told: list[str] = []
    merge_indexes([tmp_path / "a", tmp_path / "b"], tmp_path / "m", on_renumber=told.append)
    m = Index.load(tmp_path / "m")
    assert told and len(m) == 3000 and m.ntotal == 3000
    assert "img/000005.jpg" not in m and m.get(m.id_of("new/q0.jpg"))["metadata"] == {"shop": 9}
    assert m.search_vectors(queries[:1], 1).paths[0, 0] == "new/q0.jpg"
    np.testing.assert_allclose(m.vector(m.id_of("img/002000.jpg")), data[2000], rtol=1e-6)


def test_compaction_of_a_disk_rerank_index_streams(tmp_path: Path, data: np.ndarray, queries: np.ndarray,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import dinokit.retrieval.index as index_mod
    from dinokit.retrieval import stream

    feats = feature_folder(tmp_path / "feats", data, 500)
    idx = Index.from_shards(feats, tmp_path / "idx", kind="ivfpq", refine="disk", nlist=16)
    before = idx.search_vectors(queries, 10)
    idx.remove([int(before.ids[0, 0])], compact=False)
    idx.add(features=queries[:1], paths=["new/q0.jpg"])

    def no_load(*_: object) -> None:
        raise AssertionError("compaction loaded every vector into memory")

    real_add = stream._add_vectors

    def add_meanwhile(*args: object, **kw: object) -> object:
        # another writer commits while the new segment is being filled: its orphan sweep must keep the file
        Index.load(tmp_path / "idx").add(features=queries[1:2], paths=["new/q1.jpg"])
        return real_add(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(index_mod, "_live_vectors", no_load)
    monkeypatch.setattr(stream, "_add_vectors", add_meanwhile)
    assert idx.compact()
    snap = idx._store.snapshot()
    assert [s.role for s in snap.segments] == ["main", "small"] and len(snap.deleted) == 0
    assert len(idx) == 3001 and idx.ntotal == 3001
    got = idx.search_vectors(queries[:2], 1).paths[:, 0].tolist()
    assert got == ["new/q0.jpg", "new/q1.jpg"]
    # the same neighbours as before for the other queries (same codes, same exact re-rank)
    after = idx.search_vectors(queries[2:], 10)
    assert np.array_equal(after.ids, before.ids[2:]) or recall(after.ids, before.ids[2:]) >= 0.95
