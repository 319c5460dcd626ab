"""Index folders on disk: what a folder holds, replacing one atomically, and the version-1 format.

Version 1 (dinokit before the store) wrote ``index.faiss`` + ``meta.json`` + ``paths.json`` and
rewrote all three on every change. Such folders open read-only; ``dinokit index migrate`` (or
``Index.load(old).save(new)``) converts them to the store format.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinokit._io import atomic_folder
from dinokit.retrieval.kinds import faiss
from dinokit.retrieval.store import DB_FILE

log = logging.getLogger(__name__)

V1_INDEX_FILE = "index.faiss"
V1_META_FILE = "meta.json"
V1_PATHS_FILE = "paths.json"


def is_index_folder(folder: Path) -> bool:
    return (folder / DB_FILE).is_file() or (folder / V1_META_FILE).is_file()


def is_v1_folder(folder: Path) -> bool:
    return not (folder / DB_FILE).exists() and (folder / V1_META_FILE).is_file()


def check_index_target(folder: str | os.PathLike[str]) -> None:
    """Raise FileExistsError unless ``folder`` is absent, empty or an index (which saving replaces).

    Saving replaces the whole folder, so this guards e.g. the image folder itself from deletion."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not is_index_folder(folder))):
        raise FileExistsError(f"{folder}: exists and is not a dinokit index folder; refusing to replace it")


def write_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a staging folder beside ``folder`` with ``fill(tmp)``, then switch it in whole.

    :func:`dinokit._io.atomic_folder` does the switch: files and folders fsynced, one atomic rename
    exchange (or a journaled pair of renames that :func:`~dinokit._io.recover_folder` finishes or
    rolls back), so at every instant ``folder`` is the complete old or the complete new index."""
    check_index_target(folder)
    _remove_stale(folder)
    with atomic_folder(folder) as tmp:
        fill(tmp)
    return folder


def _remove_stale(folder: Path, max_age_s: float = 3600.0) -> None:
    """Remove the temp folders that saves of earlier dinokit versions (``.NAME.tmp-*``, ``.NAME.old-*``)
    left beside ``folder`` when killed, once old enough that no save can still be writing them;
    :func:`~dinokit._io.recover_folder` handles today's."""
    now = time.time()
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.old-*"):
        for p in folder.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                    log.info("%s: removing a folder left by an interrupted save", p)
                    shutil.rmtree(p, ignore_errors=True)


@dataclass
class V1Index:
    """What a version-1 folder holds: the FAISS index, paths by position (None: removed), settings."""

    index: Any
    paths: list[str | None]
    meta: dict[str, Any]


def read_v1(folder: Path) -> V1Index:
    """Read a version-1 index folder; FileNotFoundError / ValueError naming the file."""
    for name in (V1_INDEX_FILE, V1_META_FILE, V1_PATHS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing (not a dinokit index folder?)")
    try:
        meta = json.loads((folder / V1_META_FILE).read_text())
        paths = json.loads((folder / V1_PATHS_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder}: corrupt index metadata ({e})") from e
    version = meta.get("format_version")
    if version != 1:
        raise ValueError(f"{folder / V1_META_FILE}: index format version {version!r} is not supported "
                         "(this dinokit reads version 1 folders and version 2 stores)")
    try:
        index = faiss.read_index(str(folder / V1_INDEX_FILE))
    except RuntimeError as e:
        raise ValueError(f"{folder / V1_INDEX_FILE}: cannot read FAISS index ({str(e).splitlines()[-1]})") from e
    if index.ntotal != len(paths):
        raise ValueError(f"{folder}: corrupt index ({index.ntotal} vectors but {len(paths)} paths)")
    return V1Index(index, paths, meta)


def v1_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """Store settings (see :class:`dinokit.retrieval.store.Store`) from a version-1 ``meta.json``."""
    model = dict(meta.get("model") or {}) or None
    if model is not None:
        model.setdefault("source", meta.get("model_source"))
        model.setdefault("image_size", meta.get("image_size"))
    root = meta.get("root")
    return {"dim": int(meta["dim"]), "kind": meta["kind"], "knobs": {}, "model": model,
            "feature": meta.get("feature_kind", "cls"), "image_size": meta.get("image_size"),
            "root": root, "roots": [root] if root else []}
