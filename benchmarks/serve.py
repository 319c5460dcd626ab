"""Benchmark: `dinokit serve` on loopback, bounded in requests and seconds.

1. Vector queries (``POST /search`` with a JSON vector, k=10) at 1, 8 and 32 concurrent clients on an
   index of N synthetic clustered unit vectors (``--sizes 100000 1000000``): queries/s, p50, p99, errors.
2. Image queries (``POST /search`` with a 256 px JPEG, k=10) from ``--image-clients`` concurrent clients
   against the same server with dynamic batching and with ``--no-batching`` (one forward per request,
   as clip-retrieval's back end), and the bare model's batch throughput on preprocessed tensors in
   this process (no HTTP, no decoding) as the ceiling.
3. Writes (``POST /items``, one 28 px PNG each) per second while 8 clients run vector searches, then
   a check that every acknowledged item is there.

The load generator is a minimal asyncio HTTP/1.1 client with keep-alive connections (about 50 us of
CPU per request), so on a 2-core machine it takes little from the server it measures. The server is a
real ``python -m dinokit.cli serve`` subprocess; each row also gives its CPU time (all threads, from
/proc) per answered request, the figure that stays comparable on a shared machine, and the 1-minute
load average after the row. Prints a Markdown table of results.

    .venv/bin/python benchmarks/serve.py --sizes 100000 --duration 8
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FASHION = ROOT / "models" / "fashion_mnist_dino"
FASHION_PNGS = ROOT / "recipes" / "data" / "fashion-mnist-small" / "val"
TOKEN = "bench-token"


# ------------------------------------------------------------------------------------ load generator


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> int:
    writer.write(payload)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def request(path: str, body: bytes, ctype: str, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n{auth}"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "dinokitbench7f3a"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def load(port: int, payloads: list[bytes], clients: int, seconds: float, max_requests: int,
               on_ok: object = None) -> dict[str, float]:
    """``clients`` keep-alive connections sending ``payloads`` round robin for ``seconds`` (or
    ``max_requests`` in all): queries/s, p50/p99 latency in ms, errors."""
    lat: list[float] = []
    errors = 0
    sent = 0
    stop = time.perf_counter() + seconds

    async def client(c: int) -> None:
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = c
        try:
            while time.perf_counter() < stop and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                status = await _one(reader, writer, payloads[i % len(payloads)])
                lat.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1
                i += clients
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - t0
    ms = np.array(lat) * 1e3 if lat else np.array([np.nan])
    return {"n": len(lat), "qps": len(lat) / elapsed, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "errors": errors}


# ------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PIDS: dict[int, int] = {}  # port -> pid of the server on it


def cpu_seconds(port: int) -> float:
    """CPU time (user + system, all threads) the server on ``port`` has used so far."""
    fields = Path(f"/proc/{PIDS[port]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(port: int, payloads: list[bytes], clients: int, seconds: float, max_requests: int) -> dict[str, float]:
    """:func:`load` plus the server's CPU time per answered request (ms) and the 1-minute load average."""
    c0 = cpu_seconds(port)
    r = asyncio.run(load(port, payloads, clients, seconds, max_requests))
    r["cpu_ms"] = (cpu_seconds(port) - c0) * 1e3 / max(1, r["n"])
    r["loadavg"] = os.getloadavg()[0]
    return r


@contextmanager
def server(index: Path, model: Path, *args: str) -> Iterator[int]:
    """A `dinokit serve` subprocess on a free loopback port; yields the port."""
    import httpx

    port = free_port()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "dinokit.cli", "serve", str(index), "--port", str(port), "--model", str(model),
           "--token", TOKEN, *args]
    log = open(index.parent / f"server-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    PIDS[port] = proc.pid
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {(index.parent / f'server-{port}.log').read_text()[-1500:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def batch_stats(port: int) -> tuple[float, float]:
    """(forwards, images) so far, from /metrics."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    vals = {}
    for line in text.splitlines():
        if line.startswith(("dinokit_batch_size_count ", "dinokit_batch_size_sum ")):
            name, value = line.split()
            vals[name] = float(value)
    return vals.get("dinokit_batch_size_count", 0.0), vals.get("dinokit_batch_size_sum", 0.0)


# ------------------------------------------------------------------------------------ data and indexes


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 2000) -> np.ndarray:
    """(n, dim) unit vectors around random cluster centres in a 64-d subspace, plus noise."""
    rng = np.random.default_rng(seed)
    sub = min(64, dim)
    centers = rng.standard_normal((clusters, sub)).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, sub)))[0].astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 200_000):
        m = min(200_000, n - s)
        z = centers[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, sub), dtype=np.float32)
        x = z @ basis.T + 0.04 * rng.standard_normal((m, dim), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_index(folder: Path, x: np.ndarray, paths: list[str], model: object, source: Path, kind: str,
                image_size: int | None) -> Path:
    """An index store folder of ``x`` recording ``model``: one main index of ``kind`` ("auto": HNSW at
    100k, IVF-PQ at 1M), as ``dinokit index build`` writes it."""
    from dinokit.models.backbone import identity
    from dinokit.retrieval.index import Index

    info = {**identity(model), "source": str(source), "image_size": image_size}
    Index.from_features(x, paths, kind, model_info=info, image_size=image_size).save(folder)
    return folder


def jpegs(n: int, size: int = 256, seed: int = 0) -> list[bytes]:
    """Smooth random colour images as JPEG bytes (photo-like decode cost)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def image_model(name: str, folder: Path) -> Path:
    """The model image queries use: ``vit_tiny`` (random-init ViT-Ti/16, 224 px) or ``fashion`` (shipped)."""
    if name == "fashion":
        return FASHION
    import torch

    import dinokit
    from dinokit.models.backbone import create_backbone

    torch.manual_seed(0)
    dinokit.save(create_backbone("vit_tiny_patch16_224").eval(), folder)
    return folder


# ------------------------------------------------------------------------------------ phases


def vector_phase(tmp: Path, n: int, kind: str, clients: list[int], seconds: float, rows: list[str]) -> Path:
    import dinokit

    fashion = dinokit.load(str(FASHION))  # the server's model: vector queries never run it
    x = clustered(n + 1000, 256, seed=n)
    t0 = time.perf_counter()
    folder = write_index(tmp / f"vectors-{n}", x[:n], [f"v/{i}.png" for i in range(n)], fashion, FASHION, kind, 42)
    built = time.perf_counter() - t0
    queries = [request("/search", json.dumps({"vector": q.tolist(), "k": 10}).encode(), "application/json")
               for q in x[n:n + 500]]
    with server(folder, FASHION) as port:
        kind_used = json.loads(urlopen(port, "/info"))["kind"]
        asyncio.run(load(port, queries, 4, 1.0, 200))  # warm-up
        for c in clients:
            r = measured(port, queries, c, seconds, 20_000)
            rows.append(f"| vector query, k=10 | {n:,} {kind_used} (built in {built:.0f} s) | {c} clients | "
                        f"{r['qps']:,.0f} q/s | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} of {r['n']} | "
                        f"{r['cpu_ms']:.3f} | {r['loadavg']:.1f} |")
            print(rows[-1], flush=True)
    return folder


def urlopen(port: int, path: str) -> str:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=30).text


def bare_throughput(model_dir: Path, batch: int, seconds: float) -> float:
    """Images/s of the model alone on preprocessed tensors, batch ``batch`` (the ceiling for serving)."""
    import torch

    import dinokit
    from dinokit.data.transforms import eval_transform

    model = dinokit.load(str(model_dir))
    from PIL import Image

    img = Image.open(io.BytesIO(jpegs(1)[0]))
    x = eval_transform(model)(img)[None].repeat(batch, 1, 1, 1)
    done, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        model(x)  # warm-up
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            done += batch
    return done / (time.perf_counter() - t0)


def image_phase(tmp: Path, model_name: str, clients: int, seconds: float, max_batch: int, rounds: int,
                rows: list[str]) -> None:
    """Batching vs --no-batching vs the bare model, interleaved in ``rounds`` (the machine is shared:
    load drifts by 2x within minutes, so each round measures every mode back to back)."""
    import dinokit

    model_dir = image_model(model_name, tmp / f"model-{model_name}")
    model = dinokit.load(str(model_dir))
    pics = jpegs(64, seed=1)
    emb = dinokit.embed(model, np.stack([np.asarray(_decode(p)) for p in pics]), batch_size=32, num_workers=0)
    folder = write_index(tmp / f"images-{model_name}", emb.features.numpy(), [f"img/{i}.jpg" for i in range(len(pics))],
                         model, model_dir, "flat", None)
    payloads = []
    for p in jpegs(32, seed=2):
        body, ctype = multipart({"k": "10"}, {"file": ("q.jpg", p)})
        payloads.append(request("/search", body, ctype))
    per = seconds / rounds
    bare = {1: [], max_batch: []}
    served: dict[str, list[dict[str, float]]] = {"dynamic batching": [], "--no-batching": []}
    batches: dict[str, list[float]] = {"dynamic batching": [0.0, 0.0], "--no-batching": [0.0, 0.0]}
    with server(folder, model_dir, "--max-batch", str(max_batch)) as p_batch, \
            server(folder, model_dir, "--no-batching") as p_single:
        ports = {"dynamic batching": p_batch, "--no-batching": p_single}
        for port in ports.values():
            asyncio.run(load(port, payloads, 2, 2.0, 8))  # warm-up
        for _ in range(rounds):
            for b in bare:
                bare[b].append(bare_throughput(model_dir, b, per / 2))
            for mode, port in ports.items():
                f0, i0 = batch_stats(port)
                served[mode].append(measured(port, payloads, clients, per, 5_000))
                f1, i1 = batch_stats(port)
                batches[mode][0] += f1 - f0
                batches[mode][1] += i1 - i0
    ceiling = float(np.mean(bare[max_batch]))
    for b, runs in bare.items():
        rows.append(f"| bare model, batch {b} | {model_name} | - | {np.mean(runs):,.1f} img/s "
                    f"(rounds: {' '.join(f'{v:.1f}' for v in runs)}) | - | - | - | - | - |")
    for mode, runs in served.items():
        qps = float(np.mean([r["qps"] for r in runs]))
        mean_batch = batches[mode][1] / max(1.0, batches[mode][0])
        per_round = " ".join(f"{r['qps']:.1f}" for r in runs)
        rows.append(f"| image query, k=10, {mode} | {model_name}, 64 items | {clients} clients | {qps:,.1f} img/s "
                    f"({qps / ceiling:.2f} of bare batch {max_batch}; mean batch {mean_batch:.1f}; rounds: "
                    f"{per_round}) | {np.median([r['p50'] for r in runs]):.0f} | "
                    f"{np.max([r['p99'] for r in runs]):.0f} | {sum(r['errors'] for r in runs)} of "
                    f"{sum(r['n'] for r in runs)} | {np.mean([r['cpu_ms'] for r in runs]):.2f} | "
                    f"{np.mean([r['loadavg'] for r in runs]):.1f} |")
    print("\n".join(rows[-4:]), flush=True)


def _decode(data: bytes) -> object:
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def write_phase(tmp: Path, source: Path, writers: int, seconds: float, rows: list[str]) -> None:
    folder = tmp / "writes"
    shutil.copytree(source, folder)
    pngs = sorted(FASHION_PNGS.rglob("*.png"))[:50]
    payloads = []
    for i, p in enumerate(pngs):
        body, ctype = multipart({"metadata": json.dumps([{"n": i}])}, {"files": (p.name, p.read_bytes())})
        payloads.append(request("/items", body, ctype, TOKEN))
    x = clustered(300, 256, seed=7)
    queries = [request("/search", json.dumps({"vector": q.tolist(), "k": 10}).encode(), "application/json") for q in x]
    with server(folder, FASHION) as port:
        before = json.loads(urlopen(port, "/info"))["count"]

        async def both() -> tuple[dict[str, float], dict[str, float]]:
            return await asyncio.gather(load(port, payloads, writers, seconds, 5_000),
                                        load(port, queries, 8, seconds, 50_000))

        w, s = asyncio.run(both())
        after = json.loads(urlopen(port, "/info"))["count"]
    acked = w["n"] - w["errors"]
    rows.append(f"| writes (POST /items, 1 PNG) with 8 search clients | {before:,} items | {writers} writers | "
                f"{w['qps']:,.1f} writes/s; searches {s['qps']:,.0f} q/s (p99 {s['p99']:.1f} ms) | {w['p50']:.1f} | "
                f"{w['p99']:.1f} | {w['errors'] + s['errors']} of {w['n'] + s['n']}; count +{after - before} "
                f"for {acked} acknowledged | - | {os.getloadavg()[0]:.1f} |")
    print(rows[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--kind", default="auto", help="index kind for the vector indexes")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    ap.add_argument("--image-models", nargs="+", default=["vit_tiny", "fashion"], choices=["vit_tiny", "fashion"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the image comparison")
    ap.add_argument("--image-clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["vectors", "images", "writes"])
    args = ap.parse_args()
    # as the servers: spinning OpenMP threads waste the shared cores (set before torch starts its pool)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from dinokit.devices import cpu_vector_extensions

    rows = ["| test | index | load | throughput | p50 ms | p99 ms | errors | server CPU ms/request | load avg |",
            "|---|---|---|---|---|---|---|---|---|"]
    tmp = Path(tempfile.mkdtemp(prefix="dinokit-serve-bench-"))
    print(f"{dt.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{cpu_vector_extensions()}, load avg {os.getloadavg()[0]:.1f}", flush=True)
    try:
        first = None  # the writes run on the smallest vector index
        if "vectors" not in args.skip:
            for n in sorted(args.sizes):
                folder = vector_phase(tmp, n, args.kind, args.clients, args.duration, rows)
                first = first or folder
        if "images" not in args.skip:
            for name in args.image_models:
                image_phase(tmp, name, args.image_clients, args.duration * 3, args.max_batch, args.rounds, rows)
        if "writes" not in args.skip and first is not None:
            write_phase(tmp, first, args.writers, args.duration, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nload avg after: {os.getloadavg()[0]:.1f}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
