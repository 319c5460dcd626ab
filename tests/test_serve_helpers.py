"""Helpers shared by the serve tests: a test index and a real `dinokit serve` process on a free port.

The server runs as a subprocess (``python -m dinokit.cli serve``) bound to 127.0.0.1, is waited for
with a bounded poll of /healthz, and is always stopped (SIGTERM, then SIGKILL) when the block ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

import dinokit

ROOT = Path(dinokit.__file__).resolve().parent.parent
MODEL = ROOT / "models" / "fashion_mnist_dino"
IMAGES = ROOT / "recipes" / "data" / "fashion-mnist-small"
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_index(folder: Path, images: Path, model: object) -> Path:
    """Index every image under ``images`` with ``model`` into the store folder ``folder`` (flat, paths
    relative to ``images``, which is the index's root; metadata ``{"label": class folder}``)."""
    from dinokit.models.backbone import identity
    from dinokit.retrieval.index import Index

    emb = dinokit.embed(model, images, num_workers=0)
    info = {**identity(model), "source": str(MODEL), "image_size": 42}
    index = Index.create(folder, dim=emb.features.shape[1], kind="flat", model_info=info, feature="cls",
                         root=images)
    index.add(features=emb.features.numpy(), paths=[str(images / p) for p in emb.paths],
              metadata=[{"label": Path(p).parent.name} for p in emb.paths])
    return folder


def add_raw_entries(folder: Path, vectors: np.ndarray, paths: list[str]) -> list[int]:
    """Put entries with arbitrary stored paths into an index folder (for traversal tests); their ids
    (-1 where the store refuses the path, which is safe as well)."""
    from dinokit.retrieval.index import Index

    index = Index.load(folder)
    ids: list[int] = []
    for v, p in zip(vectors, paths, strict=True):
        try:
            ids.extend(index.add(features=v[None], paths=[p], metadata=[{}]).ids)
        except ValueError:
            ids.append(-1)
    return ids


class Server:
    """A running `dinokit serve` subprocess: ``url``, ``proc``, ``log`` (its stderr file)."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DINOKIT_TOKEN"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@contextmanager
def serve(index: Path, *args: str, log_dir: Path) -> Iterator[Server]:
    """Start `dinokit serve INDEX ARGS` on a free loopback port; stop it afterwards."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "dinokit.cli", "serve", str(index), "--host", "127.0.0.1", "--port", str(port),
           "--model", str(MODEL), *args]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=server_env())
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait_ready(server)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}: {server.log.read_text()[-2000:]}")
        try:
            if httpx.get(server.url + "/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s: {server.log.read_text()[-2000:]}")


def copy_index(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst
