"""A writer process for tests/test_store*.py: adds deterministic vectors to an index folder.

    python tests/store_worker.py FOLDER WORKER N_ADDS BATCH [--start-at T] [--pause STAGE MARKER]
                                 [--shared N] [--compact]

Item ``w{WORKER}/{j}/{i}`` gets the vector ``vector_for(path)`` and metadata {"w": WORKER, "j": j};
with ``--shared N`` every add also offers the paths ``shared/{j}/{i}`` (i < N) that other workers
offer too. ``--pause STAGE MARKER``: at store stage STAGE, create MARKER and sleep (the test kills
the process there). Lives outside test modules so the child imports nothing of pytest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

DIM = 16


def vector_for(path: str) -> np.ndarray:
    """A deterministic unit vector (DIM,) for ``path``."""
    seed = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _pause_at(stage: str, marker: Path):  # -> Callable[[str], None]
    def hook(name: str) -> None:
        if name == stage:
            marker.write_text(str(os.getpid()))
            time.sleep(120)  # the test kills us here; bounded in case it does not
            os._exit(3)
    return hook


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("worker", type=int)
    ap.add_argument("n_adds", type=int)
    ap.add_argument("batch", type=int)
    ap.add_argument("--start-at", type=float, default=0.0)
    ap.add_argument("--pause", nargs=2, default=None)
    ap.add_argument("--shared", type=int, default=0)
    ap.add_argument("--compact", action="store_true")
    args = ap.parse_args()

    from dinokit.retrieval import store
    from dinokit.retrieval.index import Index

    if args.pause:
        store.pause_hook = _pause_at(args.pause[0], Path(args.pause[1]))
    index = Index.load(args.folder)
    while time.time() < args.start_at:  # start together with the other writers
        time.sleep(0.01)
    for j in range(args.n_adds):
        paths = [f"w{args.worker}/{j}/{i}" for i in range(args.batch)]
        paths += [f"shared/{j}/{i}" for i in range(args.shared)]
        feats = np.stack([vector_for(p) for p in paths])
        meta = [{"w": args.worker, "j": j} for _ in paths]
        index.add(features=feats, paths=paths, metadata=meta)
        print(f"committed {j}", flush=True)
    if args.compact:
        index.compact()
        print("compacted", flush=True)


if __name__ == "__main__":
    sys.exit(main())
