"""The on-disk layout of a sharded feature folder: shard files, their records and ``manifest.json``.

A folder written by :func:`dinokit.embedding.embed_to_folder` holds, for shard ``i``::

    shard-00000.parquet            columns path, <metadata...>, features (fixed-size list of float32)
    shard-00000.json               its record: item range, rows, sha256 of each file, skipped images

or, with ``format="npy"``, ``shard-00000.npy`` (features (n, D) float32) plus ``shard-00000.rows.jsonl``
(one JSON object per row: ``path`` and the metadata). Every file is written atomically and the record
last, so a record whose checksums match means a complete shard. ``manifest.json`` (the inputs, model
identity, preprocessing, feature kind and the list of shard records) says ``"status": "complete"``
once every shard exists; it says ``"running"`` while a job (or a killed job) is unfinished.

This module knows files only: no model, no torch.distributed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from dinokit._io import atomic_path, write_json

MANIFEST = "manifest.json"
FORMATS = ("parquet", "npy")
FORMAT_VERSION = 1
#: manifest fields that must match for ``--resume`` to continue a job
JOB_FIELDS = ("inputs", "model", "preprocessing", "features", "feature_shape", "format", "shard_size", "compute")
#: job fields a manifest from an older dinokit may lack: not compared when the old manifest has none
_NEWER_JOB_FIELDS = frozenset({"compute"})

Columns = dict[str, list[Any]]


def shard_stem(index: int, n_shards: int) -> str:
    """``shard-00042``: zero-padded to at least 5 digits so names sort in shard order."""
    return f"shard-{index:0{max(5, len(str(max(n_shards - 1, 0))))}d}"


def plan_shards(n_items: int, shard_size: int) -> list[tuple[int, int]]:
    """Item ranges ``[start, stop)`` of each shard: consecutive, ``shard_size`` items each (last shorter).

    The plan depends on the item count and shard size only, never on the number of ranks, so runs with
    any world size (and their resumes) write the same shards.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, n_items)) for s in range(0, n_items, shard_size)]


def my_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    """Shard indices of one rank: round robin, so every rank gets the same share of the items."""
    return list(range(rank, n_shards, world_size))


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ writing


def _parquet_table(features: np.ndarray, paths: list[str], metadata: Columns, info: dict[str, Any]) -> Any:
    # pyarrow is imported where parquet is used: it is heavy and npy/npz users do not need it.
    import pyarrow as pa

    n = len(paths)
    if len(features) != n:
        raise ValueError(f"{len(features)} feature rows but {n} paths")
    width = int(np.prod(features.shape[1:], dtype=np.int64))  # (n, P, D) patch features: P * D per row
    flat = np.ascontiguousarray(features, dtype=np.float32).reshape(-1)
    feats = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width)
    cols: dict[str, Any] = {"path": pa.array(paths, type=pa.string())}
    for name, values in metadata.items():
        if name in ("path", "features"):
            raise ValueError(f"metadata column {name!r} clashes with a feature-file column")
        cols[name] = pa.array(values)
    cols["features"] = feats
    meta = {b"dinokit": json.dumps({**info, "feature_shape": list(features.shape[1:])}, default=str).encode()}
    return pa.table(cols).replace_schema_metadata(meta)


def write_parquet(path: str | os.PathLike[str], features: np.ndarray, paths: list[str],
                  metadata: Columns | None = None, info: dict[str, Any] | None = None) -> None:
    """Write one parquet feature file atomically: ``path``, metadata columns, ``features``
    (fixed-size list of float32; (N, P, D) patch features are flattened, their shape kept in the
    schema metadata ``dinokit``)."""
    import pyarrow.parquet as pq

    table = _parquet_table(features, paths, metadata or {}, info or {})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_npy_shard(folder: Path, stem: str, features: np.ndarray, paths: list[str],
                     metadata: Columns) -> dict[str, str]:
    with atomic_path(folder / f"{stem}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(features, dtype=np.float32))
    with atomic_path(folder / f"{stem}.rows.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, p in enumerate(paths):
            f.write(json.dumps({"path": p, **{k: v[i] for k, v in metadata.items()}}, default=str) + "\n")
    return {"features": f"{stem}.npy", "rows": f"{stem}.rows.jsonl"}


def write_shard(folder: str | os.PathLike[str], index: int, n_shards: int, items: tuple[int, int],
                features: np.ndarray, paths: list[str], metadata: Columns, skipped: list[tuple[str, str]],
                fmt: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write shard ``index`` (features (n, ...) float32, n paths, metadata columns of n values) and then
    its record; returns the record (what the manifest lists)."""
    folder = Path(folder)
    stem = shard_stem(index, n_shards)
    if fmt == "parquet":
        write_parquet(folder / f"{stem}.parquet", features, paths, metadata, info)
        files = {"features": f"{stem}.parquet"}
    elif fmt == "npy":
        files = _write_npy_shard(folder, stem, features, paths, metadata)
    else:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    record = {
        "index": index, "items": list(items), "rows": len(paths), "files": files,
        "sha256": {name: sha256_file(folder / name) for name in files.values()},
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }
    write_json(folder / f"{stem}.json", record)
    return record


# ------------------------------------------------------------------------------------ checking


def complete_record(folder: str | os.PathLike[str], index: int, n_shards: int,
                    items: tuple[int, int]) -> dict[str, Any] | None:
    """The record of shard ``index`` when it is complete (record present, same item range, every file
    present with its recorded sha256), else None: the shard must be (re)done."""
    folder = Path(folder)
    try:
        record = json.loads((folder / f"{shard_stem(index, n_shards)}.json").read_text())
        if record.get("index") != index or list(record.get("items", ())) != list(items):
            return None
        for name in record["files"].values():
            if sha256_file(folder / name) != record["sha256"][name]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``folder/manifest.json`` as a dict; FileNotFoundError / ValueError (one line) otherwise."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a feature folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise ValueError(f"{path}: not a dinokit feature manifest")
    return manifest


def job_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first job field that differs between two manifests (None when ``--resume`` may continue)."""
    for key in JOB_FIELDS:
        if key in _NEWER_JOB_FIELDS and key not in old:
            continue
        if json.dumps(old.get(key), sort_keys=True, default=str) != json.dumps(new.get(key), sort_keys=True,
                                                                             default=str):
            return key
    return None


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> int:
    """Delete the temp files a killed writer left (``.shard-*.tmp*``, ``.manifest.json.*``); returns how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp*"):
        if p.name.startswith((".shard-", f".{MANIFEST}.")):
            p.unlink(missing_ok=True)
            n += 1
    return n


# ------------------------------------------------------------------------------------ reading


def read_parquet(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str], Columns, dict[str, Any]]:
    """One parquet feature file -> (features (N, ...) float32, paths, metadata columns, info)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from e
    if "features" not in table.column_names or "path" not in table.column_names:
        raise ValueError(f"{path}: a feature parquet needs 'path' and 'features' columns")
    raw = (table.schema.metadata or {}).get(b"dinokit")
    info = json.loads(raw) if raw else {}
    col = table.column("features").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type) and not pa.types.is_list(col.type):
        raise ValueError(f"{path}: column 'features' is {col.type}, expected a list of floats")
    n = len(table)
    # a writable copy: torch.from_numpy of arrow's read-only buffer warns and would allow writes into it
    flat = np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    shape = info.pop("feature_shape", None) or [flat.size // max(n, 1)]
    feats = flat.reshape(n, *[int(s) for s in shape]) if n else np.empty((0, *shape), np.float32)
    paths = [str(p) for p in table.column("path").to_pylist()]
    meta = {c: table.column(c).to_pylist() for c in table.column_names if c not in ("path", "features")}
    return feats, paths, meta, info


def read_shard(folder: str | os.PathLike[str], record: dict[str, Any],
               feature_shape: list[int]) -> tuple[np.ndarray, list[str], Columns]:
    """One shard of a feature folder -> (features (n, *feature_shape), paths, metadata columns)."""
    folder = Path(folder)
    files = record["files"]
    if files["features"].endswith(".parquet"):
        feats, paths, meta, _ = read_parquet(folder / files["features"])
    else:
        feats = np.load(folder / files["features"], allow_pickle=False)
        rows = [json.loads(line) for line in (folder / files["rows"]).read_text(encoding="utf-8").splitlines()]
        paths = [str(r.pop("path")) for r in rows]
        names = list(rows[0]) if rows else []
        meta = {k: [r.get(k) for r in rows] for k in names}
    if len(feats) != record["rows"] or len(paths) != record["rows"]:
        raise ValueError(f"{folder / files['features']}: {len(feats)} rows, the manifest says {record['rows']}")
    return feats.reshape(len(feats), *feature_shape) if len(feats) else feats, paths, meta


def n_shards_of(manifest: dict[str, Any]) -> int:
    count = int(manifest["inputs"]["count"])
    return math.ceil(count / int(manifest["shard_size"])) if count else 0
