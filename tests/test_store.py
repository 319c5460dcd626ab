"""The index store with real SQLite files and real processes: concurrent writers, kills at every
stage, bytes written per add, version-1 folders and their migration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from dinokit.cli import app
from dinokit.retrieval.index import Index
from tests.store_worker import DIM, vector_for

# tiny indexes: OpenMP threads only add spin-waiting on the shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_faiss_thread")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("store_worker.py")




def _env() -> dict[str, str]:
    # the children import this worktree's dinokit and use one thread each (2 shared cores)
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _worker(folder: Path, worker: int, n_adds: int, batch: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), str(folder), str(worker), str(n_adds), str(batch), *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _empty_store(folder: Path, seed_items: int = 0) -> Index:
    index = Index.create(folder, dim=DIM, kind="flat")
    if seed_items:
        paths = [f"seed/{i}" for i in range(seed_items)]
        index.add(features=np.stack([vector_for(p) for p in paths]), paths=paths)
    return index


def _check_consistent(folder: Path) -> Index:
    """Load ``folder`` and check every live item: unique path, its own vector, its metadata."""
    index = Index.load(folder)
    live = index._store.live()
    paths = [p for _, p in live]
    assert len(paths) == len(set(paths)) == index.count
    for i, p in live:
        np.testing.assert_allclose(index.vector(i), vector_for(p), rtol=0, atol=1e-6)
    # every live item is found by its own vector, nothing else outranks it
    if live:
        ids = np.array([i for i, _ in live[:50]])
        res = index.search_by_id(int(ids[0]), k=1)
        assert res.ids[0, 0] == ids[0]
    return index


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    _empty_store(folder)
    n_workers, n_adds, batch, shared = 4, 6, 5, 3
    start = time.time() + 4.0  # after the children have imported dinokit
    procs = [_worker(folder, w, n_adds, batch, "--start-at", str(start), "--shared", str(shared))
             for w in range(n_workers)]
    reader = Index.load(folder, read_only=True)
    seen, deadline = [], time.time() + 90
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        reader.refresh()
        n = reader.count
        res = reader.search_vectors(vector_for("w0/0/0"), k=5)
        # a reader sees whole commits only: every result has its path, none is missing while items exist
        assert (res.ids >= 0).sum() == min(5, n) and all(p is not None for p in res.paths[0][: min(5, n)])
        seen.append(n)
        time.sleep(0.05)
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert seen == sorted(seen)  # never goes back
    index = _check_consistent(folder)
    expected = {f"w{w}/{j}/{i}" for w in range(n_workers) for j in range(n_adds) for i in range(batch)}
    expected |= {f"shared/{j}/{i}" for j in range(n_adds) for i in range(shared)}
    assert set(index.paths) == expected and index.count == len(expected)
    info = index.info()
    assert info["small_segments"] <= 8  # merged as they came (O(log n) segments)
    by_meta = index.search_vectors(vector_for("w2/3/1"), k=200, filter={"w": 2, "j": 3})
    assert sorted(p for p in by_meta.paths[0] if p and p.startswith("w")) == sorted(f"w2/3/{i}" for i in range(batch))


@pytest.mark.parametrize("stage", ["segment-written", "before-commit", "committed"])
def test_writer_killed_mid_add_leaves_the_last_commit(tmp_path: Path, stage: str) -> None:
    folder = tmp_path / "idx"
    _empty_store(folder, seed_items=12)
    marker = tmp_path / "paused"
    proc = _worker(folder, 1, 3, 4, "--pause", stage, str(marker))
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "worker never paused"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    index = _check_consistent(folder)
    # the first add was interrupted: before its commit nothing of it exists, after it all of it does
    assert index.count == (12 + 4 if stage == "committed" else 12)
    # the next writer works (the dead process's lock is gone) and removes the orphan files
    res = index.add(features=np.stack([vector_for("after/0")]), paths=["after/0"])
    assert len(res.ids) == 1
    names = {p.name for p in folder.iterdir()}
    referenced = {s.name for s in index._store.snapshot().segments}
    assert {n.split(".")[0] for n in names if n.startswith(("seg-", "main-"))} == referenced
    assert not [n for n in names if n.endswith(".tmp")]


@pytest.mark.parametrize("stage", ["compact-written", "compact-committed"])
def test_compaction_killed_leaves_a_whole_state(tmp_path: Path, stage: str) -> None:
    folder = tmp_path / "idx"
    index = _empty_store(folder, seed_items=30)
    index.remove([0, 1, 2])
    marker = tmp_path / "paused"
    proc = _worker(folder, 2, 1, 5, "--compact", "--pause", stage, str(marker))
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "worker never paused"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    index = _check_consistent(folder)
    assert index.count == 27 + 5
    compacted = stage == "compact-committed"
    assert (index.ntotal == index.count) == compacted  # removed vectors dropped only by the commit
    index.compact()
    assert index.ntotal == index.count == 32 and index.info()["small_segments"] == 0


def test_writer_killed_at_random_moments(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    _empty_store(folder)
    rng = np.random.default_rng(0)
    committed = 0
    for round_ in range(3):
        proc = _worker(folder, 10 + round_, 200, 3)
        # wait for the first commit, then kill at a random moment of the following adds
        line = proc.stdout.readline()
        assert line.startswith("committed"), proc.stderr.read()
        time.sleep(float(rng.uniform(0.0, 0.4)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        index = _check_consistent(folder)
        assert index.count % 3 == 0 and index.count > committed  # whole adds only
        committed = index.count
    assert len(Index.load(folder).add(features=vector_for("x")[None], paths=["x"]).ids) == 1


def _bytes_written() -> int:
    # bytes this process handed to write(2) (Linux): what an add costs on disk, independent of caching
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_add_cost_does_not_grow_with_the_index(tmp_path: Path) -> None:
    costs, sizes = {}, {}
    for n in (200, 20_000):
        rng = np.random.default_rng(n)
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        Index.from_features(x, [f"old/{i:06d}" for i in range(n)], kind="flat").save(tmp_path / str(n))
        index = Index.load(tmp_path / str(n))
        size_before = sum(p.stat().st_size for p in (tmp_path / str(n)).iterdir())
        before = _bytes_written()
        for j in range(3):
            paths = [f"new/{j}/{i}" for i in range(10)]
            index.add(features=np.stack([vector_for(p) for p in paths]), paths=paths)
        costs[n] = _bytes_written() - before
        assert index.count == n + 30
        # the main segment (n vectors) was not rewritten: the folder grew by about the new items only
        grown = sum(p.stat().st_size for p in (tmp_path / str(n)).iterdir()) - size_before
        assert grown < 200_000, grown
        sizes[n] = size_before
    # 100x the items, about the same bytes per add (a few B-tree pages more at most)
    assert costs[20_000] < 1.5 * costs[200] + 16_384, costs
    assert costs[20_000] < sizes[20_000] / 4, (costs, sizes)  # far below rewriting the index


def _write_v1(folder: Path, x: np.ndarray, paths: list[str | None], kind: str = "flat") -> None:
    """A version-1 folder, as dinokit 0.1 saved it (index.faiss + meta.json + paths.json)."""
    folder.mkdir()
    if kind == "flat":
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    faiss.write_index(index, str(folder / "index.faiss"))
    (folder / "paths.json").write_text(json.dumps(paths))
    knobs = {} if kind == "flat" else {"M": 32, "ef_construction": 40, "ef_search": 64}
    meta = {"format_version": 1, "kind": kind, "knobs": knobs, "count": sum(p is not None for p in paths),
            "dim": x.shape[1], "feature_kind": "cls", "image_size": 32, "root": "/data/photos",
            "model": {"name": "m", "fingerprint": "abc"}, "model_source": "/models/m", "metric": "inner_product"}
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_version1_folder_opens_read_only_and_migrates(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    paths: list[str | None] = [f"a/{i}.png" for i in range(300)]
    paths[5] = None  # removed before the folder was saved
    old = tmp_path / "old"
    _write_v1(old, x, paths, kind)
    index = Index.load(old)
    assert index.count == 299 and index.kind == kind and index.model_source == "/models/m"
    res = index.search_vectors(x[:4], k=3)
    np.testing.assert_array_equal(res.ids[:, 0], [0, 1, 2, 3])
    assert 5 not in index.search_vectors(x[5], k=10).ids
    with pytest.raises(PermissionError, match="dinokit index migrate"):
        index.add(features=x[:1], paths=["new.png"])
    code = CliRunner().invoke(app, ["index", "migrate", str(old), "--out", str(tmp_path / "new")])
    assert code.exit_code == 0, code.stderr
    new = Index.load(tmp_path / "new")
    assert new.info()["format_version"] == 2 and new.count == 299 and new.kind == kind
    assert new.get(7) == {"id": 7, "path": "a/7.png", "metadata": {}}
    assert new.resolve("a/7.png") == Path("/data/photos/a/7.png")
    np.testing.assert_array_equal(new.search_vectors(x[:4], k=3).ids, res.ids)
    assert len(new.add(features=x[:1] * -1, paths=["new.png"]).ids) == 1
    # in place: the old folder becomes a store
    code = CliRunner().invoke(app, ["index", "migrate", str(old)])
    assert code.exit_code == 0, code.stderr
    assert (old / "index.db").is_file() and not (old / "paths.json").exists()
    assert Index.load(old).count == 299
    code = CliRunner().invoke(app, ["index", "migrate", str(old)])
    assert code.exit_code == 1 and "nothing to migrate" in code.stderr


def test_adds_and_removes_go_on_during_a_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from dinokit.retrieval import index as index_mod

    folder = tmp_path / "idx"
    index = _empty_store(folder, seed_items=40)
    index.remove([0, 1])
    building, release = threading.Event(), threading.Event()
    real_build = index_mod._reuse_or_build

    def slow_build(*args, **kwargs):
        building.set()
        assert release.wait(30)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(index_mod, "_reuse_or_build", slow_build)
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(index.compact()))
    worker.start()
    assert building.wait(30)
    # the build runs outside the write lock: other writers (here: another handle) are not blocked
    other = Index.load(folder)
    assert other.compact() is False  # one compaction at a time
    for j in range(4):
        paths = [f"during/{j}/{i}" for i in range(3)]
        other.add(features=np.stack([vector_for(p) for p in paths]), paths=paths)
    other.remove([5])  # in the compacted set: stays marked after the swap
    release.set()
    worker.join(30)
    assert results == [True]
    final = _check_consistent(folder)
    assert final.count == 40 - 3 + 12 and 5 not in final.search_by_id(6, k=60).ids
    info = final.info()
    assert info["small_segments"] >= 1 and info["ntotal"] == 38 + 12  # 0 and 1 dropped, 5 still stored
    assert final.compact() and final.info()["ntotal"] == final.count == 49
