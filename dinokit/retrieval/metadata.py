"""Per-item metadata: reading metadata files keyed by path, and equality filters as SQL.

Metadata is a JSON object per item (the user's product id, URL, label...). It comes as a list of
dicts (one per item, in input order), a mapping ``path -> dict``, or a file with a ``path`` column:
CSV (values stay strings), JSON lines (one object per line, values keep their JSON types) or
parquet (needs pyarrow).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MetadataLike = Sequence[Mapping[str, Any] | None] | Mapping[str, Mapping[str, Any]] | str | os.PathLike[str]
#: a metadata value a filter can match (JSON scalars; lists and objects are not filterable)
Scalar = str | int | float | bool | None
#: equality on metadata fields, several keys AND-ed: ``{"sku": "b", "year": 2024}``
Filter = Mapping[str, Scalar]

_FILE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")


def read_metadata_file(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{path: metadata}`` from a CSV, JSON-lines or parquet file with a ``path`` column.

    Raises FileNotFoundError / ValueError naming the file (and the line for JSON lines)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such metadata file")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".ndjson"):
        rows = _read_jsonl(p)
    elif suffix == ".parquet":
        rows = _read_parquet(p)
    else:
        raise ValueError(f"{p}: unknown metadata file type (expected {', '.join(_FILE_SUFFIXES)})")
    out: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        key = row.get("path")
        if key is None or key == "":
            raise ValueError(f"{p}: row {i + 1} has no 'path' value (the column that names the image)")
        out[str(key)] = {k: _json_safe(v) for k, v in row.items() if k != "path"}
    return out


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: line {n} is not JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{p}: line {n} is not a JSON object")
        rows.append(obj)
    return rows


def _read_parquet(p: Path) -> list[dict[str, Any]]:
    # pyarrow is large and only needed for parquet metadata files, so it is imported here
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"{p}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        return pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ValueError(f"{p}: cannot read parquet ({str(e).splitlines()[0]})") from e


def _json_safe(v: Any) -> Any:
    """Values from files as JSON types (NaN -> None; numpy/arrow scalars -> Python)."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def is_metadata_file(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def check_metadata(meta: Any, where: str) -> dict[str, Any]:
    """``meta`` as a JSON-serializable dict (None -> {}); TypeError/ValueError naming ``where``."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"{where}: metadata must be a dict, got {type(meta).__name__}")
    out = {str(k): v for k, v in meta.items()}
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: metadata is not JSON-serializable ({e})") from e
    return out


# ---------------------------------------------------------------------------- filters


def _typed(value: Any) -> tuple[str, Any] | None:
    """(type tag, SQL value) of a filterable JSON scalar: "s" string, "n" number, "b" boolean, "z" null;
    None for lists, objects and non-finite numbers (not filterable)."""
    if value is None:
        return "z", 0
    if isinstance(value, bool):
        return "b", int(value)
    if isinstance(value, (int, float)):
        return ("n", value) if math.isfinite(value) else None
    if isinstance(value, str):
        return "s", value
    return None


def field_rows(item_id: int, meta: Mapping[str, Any]) -> list[tuple[int, str, str, Any]]:
    """Rows (id, key, type tag, value) of the filterable top-level fields of one item's metadata."""
    rows = []
    for key, value in meta.items():
        typed = _typed(value)
        if typed is not None:
            rows.append((item_id, str(key), *typed))
    return rows


def filter_query(flt: Filter) -> tuple[str, list[Any]]:
    """SQL selecting the ids of items (removed ones included) whose metadata equals ``flt`` on every key.

    Equality is JSON equality: strings match strings, numbers match numbers (1 == 1.0), true/false
    match only booleans, None matches a JSON null. Each key is one lookup in the (key, type, value)
    index of the ``fields`` table, so a filter costs O(matching items), not O(index).
    Lists/objects are not filterable (ValueError)."""
    if not isinstance(flt, Mapping) or not flt:
        raise ValueError(f"filter must be a non-empty JSON object of field: value, got {flt!r}")
    parts, params = [], []
    for key, value in flt.items():
        typed = _typed(value)
        if typed is None:
            raise ValueError(f"filter {key!r}: only strings, finite numbers, booleans and null can be matched, "
                             f"got {type(value).__name__}")
        parts.append("SELECT id FROM fields WHERE key = ? AND t = ? AND value = ?")
        params += [str(key), *typed]
    return " INTERSECT ".join(parts), params


def matches(meta: Mapping[str, Any], flt: Filter | None) -> bool:
    """Python twin of :func:`filter_query` (for tests and in-memory checks)."""
    for key, value in (flt or {}).items():
        if key not in meta:
            return False
        got = meta[key]
        if isinstance(value, bool) or isinstance(got, bool) or value is None or got is None:
            if not (type(got) is type(value) and got == value):
                return False
        elif isinstance(value, (int, float)) != isinstance(got, (int, float)) or got != value:
            return False
    return True
