"""Sharded feature folders: layout, checksums, resume after a crash, readers, and 2 torchrun processes.

The data: 40 Fashion-MNIST PNGs shipped in recipes/data (4 classes x 10) plus one corrupt file; the
model: the shipped models/fashion_mnist_dino (a small ResNet, 42 px input).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import dinokit
from dinokit import embedding
from dinokit.embedding import Embeddings, embed, embed_to_folder, iter_embeddings, load_embeddings
from dinokit.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "fashion_mnist_dino"
SMALL = REPO / "recipes" / "data" / "fashion-mnist-small" / "val"
CLASSES = ("Bag", "Coat", "Dress", "Sandal")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread, as each torchrun process on a CPU has: the same kernels, the same bits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for c in CLASSES:
        (root / c).mkdir()
        for p in sorted((SMALL / c).glob("*.png"))[:10]:
            shutil.copy(p, root / c / p.name)
    (root / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return dinokit.load(str(MODEL))


@pytest.fixture(scope="module")
def reference(model: torch.nn.Module, images: Path) -> Embeddings:
    """The one-process, in-memory result every sharded run must reproduce."""
    e = embed(model, images, batch_size=4, num_workers=0)
    assert len(e) == 40 and [p for p, _ in e.skipped] == ["Bag/broken.png"]
    return e


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_folder_layout_manifest_and_readers(tmp_path: Path, model: torch.nn.Module, images: Path,
                                            reference: Embeddings, fmt: str) -> None:
    out = tmp_path / "feats"
    calls: list[tuple[int, int]] = []
    m = embed_to_folder(model, images, out, batch_size=4, num_workers=0, shard_size=12, format=fmt,
                        progress=lambda d, t: calls.append((d, t)))
    assert m["status"] == "complete" and m["rows"] == 40 and m["world_size"] == 1
    assert [s["items"] for s in m["shards"]] == [[0, 12], [12, 24], [24, 36], [36, 41]]
    assert [s["rows"] for s in m["shards"]] == [11, 12, 12, 5]  # Bag/broken.png sorts into shard 0
    assert m["skipped"] == [{"path": "Bag/broken.png", "reason": m["skipped"][0]["reason"], "shard": 0}]
    assert m["shards"][0]["skipped"][0]["path"] == "Bag/broken.png"
    assert m["inputs"]["count"] == 41 and m["feature_shape"] == [256] and m["features"] == "cls"
    assert m["model"]["arch"] == "resnet18" and m["preprocessing"]["crop_size"] == 42
    for s in m["shards"]:  # the recorded checksums are the files' sha256
        for name, digest in s["sha256"].items():
            assert _sha(out / name) == digest
    assert json.loads((out / "manifest.json").read_text()) == m
    assert calls[-1] == (41, 41) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    back = load_embeddings(out)
    assert back.paths == reference.paths and back.skipped == reference.skipped
    torch.testing.assert_close(back.features, reference.features, atol=0, rtol=0)
    parts = list(iter_embeddings(out, verify=True))
    assert [len(p) for p in parts] == [11, 12, 12, 5]
    assert [(p.info["shard"], p.info["row_offset"], p.info["items"]) for p in parts] == [
        (0, 0, [0, 12]), (1, 11, [12, 24]), (2, 23, [24, 36]), (3, 35, [36, 41])]
    assert torch.equal(torch.cat([p.features for p in parts]), back.features)
    assert repr(back) == "Embeddings(40 x 256 float32, features=cls, model=" + str(MODEL) + ", skipped=1)"
    if fmt == "npy":
        assert np.load(out / "shard-00001.npy").shape == (12, 256)
        rows = (out / "shard-00001.rows.jsonl").read_text().splitlines()
        assert json.loads(rows[0]) == {"path": reference.paths[11]}


def test_parquet_shard_read_by_pyarrow_and_metadata_columns(tmp_path: Path, model: torch.nn.Module,
                                                            images: Path, reference: Embeddings) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "t.csv"
    rels = reference.paths[::-1]  # a table in another order, with two metadata columns
    table.write_text("path,label,score\n" + "".join(
        f"{images / p},{p.split('/')[0]},{i / 4}\n" for i, p in enumerate(rels)))
    out = tmp_path / "feats"
    embed_to_folder(model, table, out, batch_size=8, num_workers=0, shard_size=16)
    t = pq.read_table(out / "shard-00001.parquet")
    assert t.column_names == ["path", "label", "score", "features"]
    assert t.schema.field("features").type == pa.list_(pa.float32(), 256)  # fixed-size list
    assert t.column("path").to_pylist() == [str(images / p) for p in rels[16:32]]
    assert t.column("label").to_pylist() == [p.split("/")[0] for p in rels[16:32]]
    assert t.column("score").to_pylist() == [i / 4 for i in range(16, 32)]
    feats = np.stack(t.column("features").to_pylist())
    np.testing.assert_array_equal(feats, reference.features.numpy()[::-1][16:32])
    e = load_embeddings(out)
    assert e.metadata["label"][:3] == ["Sandal"] * 3 and len(e.metadata["score"]) == 40
    for mod in ("pandas", "duckdb"):  # the other readers, where installed
        try:
            __import__(mod)
        except ImportError:
            continue
        if mod == "pandas":
            import pandas as pd

            df = pd.read_parquet(out / "shard-00000.parquet")
            assert list(df.columns) == ["path", "label", "score", "features"] and len(df) == 16
        else:
            import duckdb

            n = duckdb.sql(f"select count(*) from '{out}/shard-*.parquet'").fetchone()[0]
            assert n == 40


def test_single_file_outputs_including_parquet(tmp_path: Path, reference: Embeddings) -> None:
    e = Embeddings(reference.features[:5], reference.paths[:5], [], {"model": "m"},
                   {"label": ["a", "b", "c", "d", "e"]})
    for suffix in (".npz", ".safetensors", ".parquet"):
        back = load_embeddings(e.save(tmp_path / f"f{suffix}"))
        assert back.paths == e.paths and back.metadata == e.metadata and back.info["model"] == "m"
        assert torch.equal(back.features, e.features)
    assert [len(x) for x in iter_embeddings(tmp_path / "f.parquet")] == [5]


def test_crash_then_resume_gives_every_image_once(tmp_path: Path, model: torch.nn.Module, images: Path,
                                                  reference: Embeddings, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "feats"
    real = embedding.write_shard
    written: list[int] = []

    def crash_after_two(*args: object, **kwargs: object) -> dict:
        if len(written) == 2:
            raise KeyboardInterrupt  # stands in for a kill: nothing after this point runs
        written.append(int(args[1]))  # type: ignore[call-overload]
        return real(*args, **kwargs)

    monkeypatch.setattr(embedding, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        embed_to_folder(model, images, out, batch_size=4, num_workers=0, shard_size=8)
    monkeypatch.setattr(embedding, "write_shard", real)
    assert read_manifest(out)["status"] == "running"
    with pytest.raises(ValueError, match=r"unfinished embedding job \(2 of 6 shards\).*--resume"):
        load_embeddings(out)
    with pytest.raises(ValueError, match="earlier embedding job; pass --resume"):
        embed_to_folder(model, images, out, batch_size=4, num_workers=0, shard_size=8)
    with pytest.raises(ValueError, match="different shard_size"):
        embed_to_folder(model, images, out, batch_size=4, num_workers=0, shard_size=10, resume=True)
    # the job ran in fp32 (pinned for the tests): bf16 features must not join it
    with pytest.raises(ValueError, match="different compute"):
        embed_to_folder(model, images, out, batch_size=4, num_workers=0, shard_size=8, resume=True,
                        precision="bf16")
    (out / ".shard-00002.parquet.abc.tmp.parquet").write_bytes(b"half a shard")  # a killed writer's temp
    kept = (out / "shard-00000.parquet").stat().st_mtime_ns
    damaged = out / "shard-00001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")  # same size, wrong checksum
    m = embed_to_folder(model, images, out, batch_size=4, num_workers=0, shard_size=8, resume=True)
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == kept  # verified, not redone
    assert not list(out.glob(".*tmp*"))
    e = load_embeddings(out)
    assert e.paths == reference.paths and len(set(e.paths)) == 40 and m["rows"] == 40
    torch.testing.assert_close(e.features, reference.features, atol=0, rtol=0)
    assert [s["path"] for s in m["skipped"]] == ["Bag/broken.png"]


# ------------------------------------------------------------------------------------ torchrun

KILLER = """
import os, signal, sys
from dinokit import embedding
real = embedding.write_shard
def write_then_die(*args, **kwargs):
    record = real(*args, **kwargs)
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies right after its first shard
    return record
embedding.write_shard = write_then_die
from dinokit.cli import main
sys.argv = ["dinokit", *sys.argv[1:]]
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process(model: torch.nn.Module, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Embeddings:
    """The same job as the torchrun tests (shard size 5, batch 4) in this one process."""
    out = tmp_path_factory.mktemp("one") / "feats"
    embed_to_folder(model, images, out, batch_size=4, num_workers=0, shard_size=5)
    return load_embeddings(out)


def _same(e: Embeddings, one: Embeddings, reference: Embeddings) -> None:
    assert e.paths == one.paths == reference.paths and e.skipped == one.skipped
    torch.testing.assert_close(e.features, one.features, atol=0, rtol=0)  # bit for bit
    # other batch boundaries (shards of 5, batches of 4) change the last bits only
    torch.testing.assert_close(e.features, reference.features, atol=1e-5, rtol=1e-5)


def _embed_args(images: Path, out: Path, *extra: str) -> list[str]:
    return ["embed", str(images), "--model", str(MODEL), "--out", str(out), "--shard-size", "5",
            "--batch-size", "4", "--workers", "0", *extra]


@pytest.mark.slow  # two torchrun launches of 2 processes: ~20 s on an idle 2-core machine
def test_two_torchrun_processes_match_one_process(tmp_path: Path, images: Path, one_process: Embeddings,
                                                  reference: Embeddings) -> None:
    res = _torchrun(["-m", "dinokit.cli", *_embed_args(images, tmp_path / "two", "--json")])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)  # rank 0 alone prints
    assert summary["world_size"] == 2 and summary["rows"] == 40 and summary["shards"] == 9
    _same(load_embeddings(tmp_path / "two"), one_process, reference)
    assert res.stderr.count("embedded 40 images") == 1


@pytest.mark.slow  # two torchrun launches of 2 processes: ~20 s on an idle 2-core machine
def test_rank_killed_by_sigkill_then_resume(tmp_path: Path, images: Path, one_process: Embeddings,
                                            reference: Embeddings) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "feats"
    res = _torchrun([str(script), *_embed_args(images, out)])
    assert res.returncode != 0  # torchrun saw rank 1 die and stopped the job
    assert read_manifest(out)["status"] == "running"
    done = sorted(p.name for p in out.glob("shard-*.json"))
    assert "shard-00001.json" in done and len(done) < 9  # rank 1's first shard made it, not the job
    res = _torchrun(["-m", "dinokit.cli", *_embed_args(images, out, "--resume")])
    assert res.returncode == 0, res.stderr[-3000:]
    e = load_embeddings(out)
    assert len(set(e.paths)) == len(e.paths) == 40  # every image exactly once
    _same(e, one_process, reference)


def test_cli_folder_output_resume_and_file_output(tmp_path: Path, images: Path, one_process: Embeddings) -> None:
    from typer.testing import CliRunner

    from dinokit.cli import app

    runner = CliRunner()
    out = tmp_path / "feats"
    args = _embed_args(images, out, "--format", "npy")
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.npy")) == [f"shard-0000{i}.npy" for i in range(9)]
    e = load_embeddings(out)
    assert e.paths == one_process.paths and torch.equal(e.features, one_process.features)
    res = runner.invoke(app, args)  # the folder holds a job: only --resume continues it
    assert res.exit_code == 1 and "--resume" in res.output
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0 and "embedded 40 images" in res.output and "Bag/broken.png" in res.output
    res = runner.invoke(app, [*args[:5], str(tmp_path / "f.parquet"), *args[6:]])
    assert res.exit_code == 0, res.output
    assert load_embeddings(tmp_path / "f.parquet").paths == one_process.paths


def test_empty_and_patch_shards_roundtrip(tmp_path: Path) -> None:
    """A shard whose images were all unreadable, and (N, P, D) patch features, in both formats."""
    from dinokit.shards import read_shard, write_shard

    patch = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    for k, fmt in enumerate(("parquet", "npy")):
        rec = write_shard(tmp_path, 2 * k, 4, (0, 1), np.empty((0, 3, 4), np.float32), [], {}, [("a.png", "empty file")],
                          fmt)
        feats, paths, meta = read_shard(tmp_path, rec, [3, 4])
        assert feats.shape == (0, 3, 4) and paths == [] and rec["skipped"] == [{"path": "a.png", "reason": "empty file"}]
        rec = write_shard(tmp_path, 2 * k + 1, 4, (1, 3), patch, ["x", "y"], {"c": [1, 2]}, [], fmt)
        feats, paths, meta = read_shard(tmp_path, rec, [3, 4])
        np.testing.assert_array_equal(feats, patch)
        assert paths == ["x", "y"] and meta == {"c": [1, 2]}
