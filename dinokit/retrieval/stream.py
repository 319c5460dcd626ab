"""Indexes larger than memory: built from a sharded feature folder shard by shard, and merged.

:func:`build_from_shards` never holds more than one shard, a training sample and the FAISS index
that the memory budget allows:

1. pass 1 over the shards (in the order and with the ``row_offset`` of
   :func:`dinokit.embedding.iter_embeddings`): each shard is normalized and
   appended to the main segment's float32 vector file (plain writes: the page cache, not this
   process, holds what was written), its items (id = the shard's ``row_offset`` + row, path,
   metadata columns) are inserted in one SQLite transaction, and the rows of a seeded random
   training sample are kept;
2. the FAISS index of the kind chosen for the row count and the budget is trained on the sample;
3. pass 2 reads the vector file back in chunks of ``chunk_rows`` and adds them to the index;
4. the main segment is committed. Everything is written in a staging folder switched in whole
   (:func:`dinokit._io.atomic_folder`): a killed build leaves no folder or the old one.

Memory (bytes per vector, D = dimension, see :func:`dinokit.retrieval.kinds.memory_per_vector`):
flat 4D and hnsw 4D + 8M hold every vector; ivfpq holds D/8 code bytes + 8 id bytes plus its re-rank
copy: 4D (``refine="flat"``), D (``"sq8"``) or nothing (``"disk"``: candidates re-ranked from the
vector file); ``ondisk=1`` also moves the codes into an ``.ivfdata`` file (faiss ``OnDiskInvertedLists``).

:func:`merge_indexes` joins index folders built elsewhere (e.g. from disjoint shard ranges on
several machines) into one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dinokit._io import crash_point
from dinokit._types import Progress
from dinokit.retrieval.folder import check_index_target, write_folder
from dinokit.retrieval.kinds import (
    DEFAULT_MEMORY_BUDGET,
    Knob,
    _new_faiss_index,
    c_stdout_to_stderr,
    faiss,
    normalize,
    reranks_from_disk,
    resolve_kind,
)
from dinokit.retrieval.metadata import MetadataLike, check_metadata, read_metadata_file
from dinokit.retrieval.store import Store

log = logging.getLogger(__name__)

#: rows added to the FAISS index at a time in pass 2 (100k x 384-d float32 = 154 MB)
CHUNK_ROWS = 100_000
_INSERT_ROWS = 100_000  # items per SQLite transaction in pass 1
_UNITS = {"": 1, "B": 1, "KB": 2**10, "K": 2**10, "MB": 2**20, "M": 2**20, "GB": 2**30, "G": 2**30,
          "TB": 2**40, "T": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of ``"4GB"``, ``"512MB"``, ``"300KB"``, ``"1.5G"`` or a plain number (binary units)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("IB", "B")
    num = s.rstrip("KMGTB ")
    unit = s[len(num):].strip()
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0 or not math.isfinite(value):
        raise ValueError(f"memory size {text!r}: expected a positive number with KB, MB, GB or TB (e.g. 4GB)")
    return int(value * _UNITS[unit])


def train_size(n: int, kind: str, knobs: dict[str, Any]) -> int:
    """Rows the FAISS index of ``kind`` trains on (0: needs no training); as kinds._train_sample."""
    if kind != "ivfpq":
        return 0
    return min(n, max(64 * int(knobs["nlist"]), 256 * 64))


def read_feature_manifest(features_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a complete sharded feature folder of (N, D) rows; ValueError (one line) otherwise."""
    from dinokit.shards import n_shards_of, read_manifest

    folder = Path(features_dir)
    manifest = read_manifest(folder)
    if manifest.get("status") != "complete":
        raise ValueError(f"{folder}: unfinished embedding job ({n_shards_of(manifest)} shards planned); "
                         "rerun the same embed command with --resume")
    shape = manifest.get("feature_shape") or []
    if len(shape) != 1:
        raise ValueError(f"{folder}: rows of shape {tuple(shape)}; an index needs one vector per image "
                         "(cls, cls+avgpool or lastN features, not patch tokens)")
    return manifest


def _model_info(manifest: dict[str, Any], model_source: str | None) -> dict[str, Any] | None:
    """What the index records about the model, from the manifest (``model_source``: how to load it)."""
    model = manifest.get("model") or {}
    if not model:
        return None
    size = (manifest.get("preprocessing") or {}).get("crop_size")
    name = model.get("model")
    return {"source": model_source or name, "name": name, "arch": model.get("arch"),
            "fingerprint": model.get("fingerprint"), "preprocessing": manifest.get("preprocessing"),
            "image_size": size}


def _root_of(manifest: dict[str, Any]) -> str | None:
    inputs = manifest.get("inputs") or {}
    spec = inputs.get("spec")
    return os.path.abspath(spec) if isinstance(spec, str) and Path(spec).is_dir() else None


def build_from_shards(features_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, kind: str = "auto",
                      memory_budget: int | str = DEFAULT_MEMORY_BUDGET, metadata: MetadataLike | None = None,
                      model_source: str | None = None, progress: Progress | None = None,
                      shards: tuple[int, int] | None = None, trained_from: str | os.PathLike[str] | None = None,
                      chunk_rows: int = CHUNK_ROWS, seed: int = 0, **knobs: Knob) -> Path:
    """Write an index folder ``out`` (replaced atomically) of the sharded feature folder ``features_dir``,
    streaming it shard by shard under ``memory_budget`` bytes (int or "4GB").

    Item ids are global row numbers (a shard's ``row_offset`` + row), so indexes built from disjoint
    shard ranges (``shards=(start, stop)``, shard numbers, stop excluded) can be merged without
    renumbering; built with the same ``trained_from`` index (an IVF-PQ index folder whose trained
    quantizers are reused instead of training), their inverted lists are merged without re-encoding. Each shard's metadata columns become the items'
    filterable metadata; ``metadata`` (a mapping path -> dict or a CSV / JSON-lines / parquet file with
    a ``path`` column) adds to them. ``model_source`` (how to load the model for image queries)
    defaults to the model name the manifest records. ``progress(done, total)`` counts rows, twice
    (written, then indexed). Returns ``out``.
    """
    features_dir, out = Path(features_dir), Path(out)
    budget = parse_size(memory_budget)
    manifest = read_feature_manifest(features_dir)
    records = shard_records(manifest, shards)
    n, dim = sum(int(r["rows"]) for r, _ in records), int(manifest["feature_shape"][0])
    if n == 0:
        raise ValueError(f"{features_dir}: no rows to index")
    if trained_from is not None:  # the trained index decides the layout; search knobs may be overridden
        kind, knobs = "ivfpq", {**_trained_knobs(trained_from), **{k: v for k, v in knobs.items()
                                                                    if k in ("nprobe", "k_factor")}}
    real_kind, full = resolve_kind(kind, dim, n, dict(knobs), budget)
    log.info("%s: %d vectors of dim %d -> %s index (%s) under a %.1f GB budget", features_dir, n, dim, real_kind,
             ", ".join(f"{k}={v}" for k, v in full.items()) or "exact", budget / 2**30)
    extra = _extra_metadata(metadata)
    settings = {"dim": dim, "kind": kind, "knobs": dict(knobs), "model": _model_info(manifest, model_source),
                "feature": manifest.get("features") or "cls",
                "image_size": (manifest.get("preprocessing") or {}).get("crop_size"), "root": _root_of(manifest),
                "main_kind": None, "main_knobs": None, "metric": "inner_product", "normalized": True,
                "memory_budget": budget}  # compactions decide "auto" under the same budget
    settings["roots"] = [settings["root"]] if settings["root"] else []
    check_index_target(out)

    def fill(tmp: Path) -> None:
        store = Store.create(tmp, settings)
        try:
            name = store.main_segment_name()
            trained = _trained_index(trained_from, real_kind, full, dim) if trained_from is not None else None
            n_train = 0 if trained is not None else train_size(n, real_kind, full)
            ids, sample = _write_vectors(store, features_dir, manifest, records, tmp / (name + ".npy"), name, n,
                                         dim, extra, n_train, seed, progress)
            index = trained if trained is not None else _new_faiss_index(real_kind, dim, full)
            if not index.is_trained:
                index.train(sample)
            del sample
            if real_kind != "flat":  # a flat main index is rebuilt from the vector file when loaded
                index = _add_vectors(index, tmp / (name + ".npy"), n, dim, chunk_rows, progress,
                                     ondisk=tmp / (name + ".ivfdata") if full.get("ondisk") else None)
            store.commit_main(name, ids, index, real_kind, full)
        finally:
            store.close()

    return write_folder(out, fill)


def _trained_knobs(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The knobs of the IVF-PQ main index of the index folder ``folder`` (ValueError for another kind)."""
    store = Store.open(Path(folder), read_only=True)
    try:
        meta = store.meta()
    finally:
        store.close()
    if meta.get("main_kind") != "ivfpq":
        raise ValueError(f"{folder}: a {meta.get('main_kind')} index; --trained-from needs an ivfpq index")
    if (meta.get("main_knobs") or {}).get("ondisk"):
        raise ValueError(f"{folder}: its inverted lists are on disk; --trained-from needs an in-RAM ivfpq index")
    return dict(meta["main_knobs"])


def _trained_index(folder: str | os.PathLike[str], kind: str, knobs: dict[str, Any], dim: int) -> Any:
    """An empty copy of the trained IVF-PQ index of the index folder ``folder``."""
    store = Store.open(Path(folder), read_only=True)
    try:
        meta = store.meta()
        main = store.snapshot().main
        if main is None or main.kind != kind or int(meta["dim"]) != dim or knobs.get("ondisk"):
            raise ValueError(f"{folder}: not an in-RAM ivfpq index of dimension {dim}")
        return _emptied(main.index)
    finally:
        store.close()


def _extra_metadata(metadata: MetadataLike | None) -> dict[str, dict[str, Any]]:
    if metadata is None:
        return {}
    if isinstance(metadata, (str, os.PathLike)):
        metadata = read_metadata_file(metadata)
    if not isinstance(metadata, dict):
        raise ValueError("metadata for a build from shards: a mapping path -> dict or a file with a 'path' column")
    return {str(k): check_metadata(v, str(k)) for k, v in metadata.items()}


@contextlib.contextmanager
def _vector_file(path: Path, n: int, dim: int) -> Iterator[BinaryIO]:
    """Create ``path`` as an (n, dim) float32 .npy file (sparse) and yield it open at its first row, for
    rows written in order with plain writes (the page cache, not this process, holds them); fsynced
    when the block ends."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    offset = int(mm.offset)
    del mm
    with open(path, "r+b") as f:
        f.seek(offset)
        yield f
        f.flush()
        os.fsync(f.fileno())


def shard_records(manifest: dict[str, Any], shards: tuple[int, int] | None) -> list[tuple[dict[str, Any], int]]:
    """(record, row_offset) of the shards ``shards`` = [start, stop) (all when None), in item order;
    row_offset is the global row number of the shard's first row, as in iter_embeddings."""
    out, row = [], 0
    records = sorted(manifest["shards"], key=lambda r: int(r["index"]))
    lo, hi = shards if shards is not None else (0, len(records))
    if not 0 <= lo < hi <= len(records):
        raise ValueError(f"shards {lo}:{hi}: the folder has shards 0:{len(records)}")
    for rec in records:
        if lo <= int(rec["index"]) < hi:
            out.append((rec, row))
        row += int(rec["rows"])
    return out


def _write_vectors(store: Store, features_dir: Path, manifest: dict[str, Any],
                   records: list[tuple[dict[str, Any], int]], path: Path, segment: str, n: int, dim: int,
                   extra: dict[str, dict[str, Any]], n_train: int, seed: int,
                   progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: every shard normalized into the vector file ``path`` and its items into the store;
    returns (ids (n,), the training sample (n_train, dim): rows at seeded random positions)."""
    from dinokit.shards import read_shard

    positions = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False)) if n_train else \
        np.zeros(0, np.int64)
    sample = np.empty((len(positions), dim), np.float32)
    ids = np.empty(n, np.int64)
    done = 0
    with _vector_file(path, n, dim) as f:
        for rec, row_offset in records:
            try:
                arr, paths, cols = read_shard(features_dir, rec, manifest["feature_shape"])
            except (OSError, KeyError) as e:
                raise ValueError(f"{features_dir}: shard {rec.get('index')} unreadable "
                                 f"({type(e).__name__}: {e})") from e
            x = _normalize_in_place(arr, dim, features_dir, rec)
            del arr
            f.write(x.data)  # C-contiguous: written without a copy
            ids[done:done + len(x)] = np.arange(row_offset, row_offset + len(x))
            lo, hi = np.searchsorted(positions, [done, done + len(x)])
            sample[lo:hi] = x[positions[lo:hi] - done]
            rows: list[tuple[int, str, dict[str, Any], bool]] = []
            for s in range(0, len(paths), _INSERT_ROWS):  # bounded Python objects per transaction
                rows = [(row_offset + i, paths[i], {**{k: v[i] for k, v in cols.items() if v[i] is not None},
                                                    **extra.get(paths[i], {})}, False)
                        for i in range(s, min(s + _INSERT_ROWS, len(paths)))]
                try:
                    store.insert_rows(rows, segment=segment, first_row=done + s)
                except sqlite3.IntegrityError as e:
                    dup = _first_duplicate_path(store, [r[1] for r in rows])
                    raise ValueError(f"{dup or features_dir}: path given twice in {features_dir}") from e
            done += len(x)
            del x, rows, paths, cols
            crash_point("index:shard-written")
            if progress is not None:
                progress(done, 2 * n)
    return ids, sample


def _normalize_in_place(arr: np.ndarray, dim: int, features_dir: Path, rec: dict[str, Any]) -> np.ndarray:
    """Unit-norm rows of a shard's float32 array (n, dim), in place when it is writable (no copy)."""
    if arr.ndim != 2 or (len(arr) and arr.shape[1] != dim):
        raise ValueError(f"{features_dir}: shard {rec.get('index')} has shape {arr.shape}, expected (n, {dim})")
    try:
        return normalize(arr, copy=False)
    except ValueError as e:
        raise ValueError(f"{features_dir}: shard {rec.get('index')}: {e}") from e


def _first_duplicate_path(store: Store, paths: Sequence[str | None]) -> str | None:
    seen: set[str] = set()
    present = store.live_ids_of([p for p in paths if p is not None])
    for p in paths:
        if p is not None and (p in seen or p in present):
            return p
        if p is not None:
            seen.add(p)
    return None


def iter_rows(path: Path, n: int, dim: int, chunk_rows: int, offset: int | None = None
              ) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 (m, dim)) chunks of an (n, dim) float32 .npy file, read with plain reads
    (no memory map: the pages read stay in the page cache, not in this process)."""
    if offset is None:  # where the data starts (the map is only opened to parse the header)
        offset = int(np.load(path, mmap_mode="r").offset)
    buf = np.empty((min(chunk_rows, max(n, 1)), dim), np.float32)
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, n, chunk_rows):
            m = min(chunk_rows, n - start)
            view = buf[:m]
            if f.readinto(view.data.cast("B")) != view.nbytes:
                raise ValueError(f"{path}: truncated vector file")
            yield start, view


def _add_vectors(index: Any, path: Path, n: int, dim: int, chunk_rows: int, progress: Progress | None,
                 ondisk: Path | None) -> Any:
    """Pass 2: the rows of the vector file added to ``index`` chunk by chunk (its inverted lists in
    the file ``ondisk`` when given)."""
    if ondisk is not None:
        invlists = faiss.OnDiskInvertedLists(index.nlist, index.code_size, str(ondisk))
        index.replace_invlists(invlists, True)
        invlists.this.disown()  # the index frees its lists
    with c_stdout_to_stderr() if ondisk is not None else contextlib.nullcontext():  # faiss's growth notices
        for start, x in iter_rows(path, n, dim, chunk_rows):
            index.add(x)
            crash_point("index:chunk-added")
            if progress is not None:
                progress(n + start + len(x), 2 * n)
    return index


# ---------------------------------------------------------------------------------------- merge


def merge_indexes(inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                  memory_budget: int | str = DEFAULT_MEMORY_BUDGET, chunk_rows: int = CHUNK_ROWS,
                  progress: Progress | None = None, on_renumber: Callable[[str], None] | None = None) -> Path:
    """Join index folders ``inputs`` (same dimension, feature kind and model) into ``out`` (replaced
    atomically).

    Ids are kept when no two inputs share one (indexes built from disjoint shard ranges), else every
    item is renumbered 0.. in input order (``on_renumber`` is told why). A path live in two inputs is an
    error naming it; removed items are dropped. The merged main index reuses the trained quantizers of
    the first input: when every input holds the same trained FAISS index parameters, their inverted
    lists are concatenated (faiss ``merge_from``); otherwise the other inputs' vectors are streamed from
    their vector files into a copy of the first one's trained index, ``chunk_rows`` at a time. Small
    segments (adds since the last compaction) are included. Returns ``out``.
    """
    if len(inputs) < 2:
        raise ValueError("merge needs at least two index folders")
    budget = parse_size(memory_budget)
    stores = [Store.open(Path(p), read_only=True) for p in inputs]
    try:
        return _merge(stores, [Path(p) for p in inputs], Path(out), budget, chunk_rows, progress, on_renumber)
    finally:
        for s in stores:
            s.close()


def _check_same(stores: list[Store], folders: list[Path]) -> dict[str, Any]:
    first = stores[0].meta()
    for store, folder in zip(stores[1:], folders[1:], strict=True):
        meta = store.meta()
        if meta["dim"] != first["dim"]:
            raise ValueError(f"{folder}: dimension {meta['dim']}, {folders[0]} has {first['dim']}")
        if meta.get("feature", "cls") != first.get("feature", "cls"):
            raise ValueError(f"{folder}: {meta.get('feature')!r} features, {folders[0]} has {first.get('feature')!r}")
        fp, want = (meta.get("model") or {}).get("fingerprint"), (first.get("model") or {}).get("fingerprint")
        if fp != want:
            raise ValueError(f"{folder}: built with another model (fingerprint {fp}, {folders[0]} has {want})")
    return first


def live_ids(snap: Any) -> np.ndarray:
    """Sorted ids (int64) of the live items of a snapshot: what its segments hold minus the deleted."""
    ids = np.concatenate([seg.ids for seg in snap.segments]) if snap.segments else np.zeros(0, np.int64)
    if len(snap.deleted):
        ids = ids[~np.isin(ids, snap.deleted)]
    return np.sort(ids)


def _duplicate_error(stores: list[Store], folders: list[Path], target: Store,
                     paths: Sequence[str | None]) -> ValueError:
    """The error for a chunk of merged items whose insert hit the live-path uniqueness rule."""
    dup = _first_duplicate_path(target, paths)
    where = [str(f) for s, f in zip(stores, folders, strict=True) if dup is not None and s.live_ids_of([dup])]
    return ValueError(f"{dup}: live in both {' and '.join(where[:2]) or 'two inputs'}")


def _emptied(index: Any) -> Any:
    """A copy of a trained FAISS index with no vectors (its quantizers kept; the original untouched)."""
    copy = faiss.clone_index(index)
    copy.reset()
    return copy


def _trained_bytes(index: Any) -> bytes | None:
    """The serialized trained parameters of an IVF index (its lists emptied), None for other kinds."""
    base = faiss.downcast_index(index)
    if not hasattr(base, "nlist"):
        return None
    return bytes(faiss.serialize_index(_emptied(base)).tobytes())


def _merge(stores: list[Store], folders: list[Path], out: Path, budget: int, chunk_rows: int,
           progress: Progress | None, on_renumber: Callable[[str], None] | None) -> Path:
    first = _check_same(stores, folders)
    dim = int(first["dim"])
    # ids (8 bytes each) are all held; paths and metadata are read a chunk at a time
    snaps = [s.snapshot() for s in stores]
    parts = [live_ids(snap) for snap in snaps]
    old_ids = np.concatenate(parts)
    source = np.concatenate([np.full(len(part), i, np.int32) for i, part in enumerate(parts)])
    del parts
    renumber = len(np.unique(old_ids)) != len(old_ids)
    if renumber and on_renumber is not None:
        on_renumber("the inputs share item ids: items renumbered 0.. in input order")
    n = len(old_ids)
    new_ids = np.arange(n, dtype=np.int64) if renumber else old_ids
    order = np.argsort(new_ids, kind="stable")  # the main segment holds its ids sorted
    first_kind, first_knobs = str(first.get("main_kind") or ""), dict(first.get("main_knobs") or {})
    kind, knobs = first_kind, first_knobs
    if not kind or first["kind"] == "auto":  # "auto" decides again for the merged count and the budget
        kind, knobs = resolve_kind(str(first["kind"]), dim, n, dict(first.get("knobs") or {}), budget)
        if (kind, _layout(knobs)) == (first_kind, _layout(first_knobs)):
            knobs = first_knobs  # the first input's layout still holds: keep its search knobs too
    mains = [snap.main for snap in snaps]
    reusable = first_kind == kind == "ivfpq" and _layout(first_knobs) == _layout(knobs) and not knobs.get("ondisk")
    same_trained = (reusable and reranks_from_disk(kind, knobs) and not renumber
                    and all(m is not None and m.kind == "ivfpq" for m in mains)
                    and len({_trained_bytes(m.index) for m in mains if m is not None}) == 1
                    and all(len(snap.deleted) == 0 and len(snap.segments) == 1 for snap in snaps)
                    and np.array_equal(order, np.arange(n)))
    settings = {k: first.get(k) for k in ("dim", "kind", "knobs", "model", "feature", "image_size", "root",
                                          "metric", "normalized")}
    settings["memory_budget"] = budget
    settings["roots"] = sorted({r for s in stores for r in (s.meta().get("roots") or [])})
    check_index_target(out)

    def fill(tmp: Path) -> None:
        store = Store.create(tmp, settings)
        try:
            name = store.main_segment_name()
            path = tmp / (name + ".npy")
            with _vector_file(path, n, dim) as f:  # rows in merged id order, chunk by chunk
                for s in range(0, n, chunk_rows):
                    rows_ = order[s:s + chunk_rows]
                    x = np.empty((len(rows_), dim), np.float32)
                    found: dict[int, tuple[str | None, dict[str, Any], bool]] = {}
                    for i, snap in enumerate(snaps):
                        mine = source[rows_] == i
                        if mine.any():
                            x[mine] = live_vectors(snap, old_ids[rows_[mine]])
                            got = stores[i].items(old_ids[rows_[mine]].tolist())
                            found.update({int(r): got[int(old_ids[r])] for r in rows_[mine]})
                    f.write(x.data)
                    items = [(int(new_ids[r]), found[int(r)][0], found[int(r)][1], False) for r in rows_]
                    try:
                        store.insert_rows(items, segment=name, first_row=s)
                    except sqlite3.IntegrityError as e:
                        raise _duplicate_error(stores, folders, store, [it[1] for it in items]) from e
                    if progress is not None:
                        progress(s + len(rows_), 2 * n)
            if kind == "flat":
                index = None
            elif same_trained:  # identical quantizers: concatenate the inverted lists, no re-encoding
                index = faiss.clone_index(mains[0].index)  # type: ignore[union-attr]
                for m in mains[1:]:  # FAISS labels are rows of the segment: shift by the rows before
                    index.merge_from(faiss.clone_index(m.index), index.ntotal)  # type: ignore[union-attr]
            else:
                index = _trained_copy(mains[0] if reusable else None, kind, knobs, path, n, dim)
                index = _add_vectors(index, path, n, dim, chunk_rows, progress,
                                     ondisk=tmp / (name + ".ivfdata") if knobs.get("ondisk") else None)
            store.commit_main(name, new_ids[order], index, kind, knobs)
        finally:
            store.close()

    return write_folder(out, fill)


def live_vectors(snap: Any, want: np.ndarray) -> np.ndarray:
    """Vectors (len(want), D) of the sorted live ids ``want`` of a snapshot, from whichever segment holds them."""
    x = np.empty((len(want), int(snap.meta["dim"])), np.float32)
    found = np.zeros(len(want), bool)
    for seg in snap.segments:
        pos = np.searchsorted(seg.ids, want)
        ok = pos < len(seg.ids)
        ok[ok] = seg.ids[pos[ok]] == want[ok]
        x[ok] = seg.vectors[pos[ok]]
        found |= ok
    if not found.all():
        raise ValueError(f"item {int(want[~found][0])}: in the database but in no vector segment")
    return x


def _layout(knobs: dict[str, Any]) -> dict[str, Any]:
    """The knobs that shape a built index (not the search-time ones)."""
    return {k: v for k, v in knobs.items() if k not in ("nprobe", "k_factor", "ef_search")}


def _trained_copy(main: Any, kind: str, knobs: dict[str, Any], path: Path, n: int, dim: int) -> Any:
    """An empty FAISS index with the trained parameters of ``main`` (the first input's main segment, when
    its layout is the merged one), else a new one trained on a sample of the merged vector file."""
    if main is not None:
        return _emptied(main.index)
    index = _new_faiss_index(kind, dim, knobs)
    if not index.is_trained:
        pos = np.sort(np.random.default_rng(0).choice(n, train_size(n, kind, knobs), replace=False))
        index.train(np.ascontiguousarray(np.load(path, mmap_mode="r")[pos], dtype=np.float32))
    return index


# ---------------------------------------------------------------------------------------- compaction


def can_compact_streamed(store: Store, snap: Any, kind: str, knobs: dict[str, Any]) -> bool:
    """True when the compaction of ``snap`` into (kind, knobs) can stream: a folder store whose main
    segment is an in-RAM-lists IVF-PQ re-ranking from disk with the same layout (its quantizers reused)."""
    main = snap.main
    main_knobs = dict(snap.meta.get("main_knobs") or {})
    return (store.folder is not None and main is not None and main.kind == kind == "ivfpq"
            and reranks_from_disk(kind, knobs) and not knobs.get("ondisk")
            and _layout(main_knobs) == _layout(knobs))


def compact_streamed(store: Store, snap: Any, kind: str, knobs: dict[str, Any], ids: np.ndarray,
                     chunk_rows: int = CHUNK_ROWS) -> None:
    """Compact ``snap`` (claimed) without holding its vectors: the live rows ``ids`` (:func:`live_ids`) are
    written in id order into a new vector file chunk by chunk (outside the write lock, the file named
    in the claim so that other writers leave it alone), re-added to an emptied copy of the main
    segment's trained index, and the new segment is installed by one commit."""
    assert store.folder is not None
    main = snap.main
    assert main is not None  # can_compact_streamed checked it
    n, dim = len(ids), int(snap.meta["dim"])
    with store.write_lock():
        name = store.claim_new_main()
    path = store.folder / (name + ".npy")
    with _vector_file(path, n, dim) as f:
        for s in range(0, n, chunk_rows):
            f.write(live_vectors(snap, ids[s:s + chunk_rows]).data)
    index = _add_vectors(_emptied(main.index), path, n, dim, chunk_rows, None, ondisk=None)
    with store.write_lock():
        store.install_main(None, ids, index, kind, knobs, replaces=[seg.name for seg in snap.segments], name=name)
