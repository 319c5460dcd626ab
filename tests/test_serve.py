"""`dinokit serve` end to end: a real server on a free loopback port, every endpoint, auth, limits,
traversal attempts, the Python client, dynamic batching, and a kill -9 while writers run."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_serve_helpers import IMAGES, MODEL, add_raw_entries, build_index, copy_index, serve, server_env

import dinokit
from dinokit.serve import auth
from dinokit.serve.batching import Batcher, Embedder
from dinokit.serve.limits import BadImage, ImageTooLarge, decode_image, parse_box

TOKEN = "s3cret-token"
BAG = IMAGES / "val" / "Bag" / "00018.png"
BOOT = sorted((IMAGES / "val" / "Ankle boot").glob("*.png"))[0]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return dinokit.load(str(MODEL))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, model: torch.nn.Module) -> dict[str, Path]:
    """A copy of the Fashion-MNIST train images (400), an index of them, and files for traversal tests:
    ``secret.png`` outside the image folder and a symlink to it inside."""
    tmp = tmp_path_factory.mktemp("serve")
    images = tmp / "images"
    shutil.copytree(IMAGES / "train", images)
    secret = tmp / "secret.png"
    Image.new("L", (28, 28), 255).save(secret)
    index = build_index(tmp / "index", images, model)
    (images / "link.png").symlink_to(secret)  # after the build: indexed only through the raw entry below
    rng = np.random.default_rng(0)
    escapes = ["../secret.png", str(secret), "link.png"]
    ids = add_raw_entries(index, rng.normal(size=(3, 256)).astype(np.float32), escapes)
    return {"tmp": tmp, "images": images, "index": index, "escape_ids": ids}  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def server(base: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    folder = copy_index(base["index"], tmp_path_factory.mktemp("srv") / "index")
    with serve(folder, "--token", TOKEN, "--max-upload-mb", "1", "--max-wait-ms", "30",
               log_dir=folder.parent) as s:
        yield s


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _header_only_png(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h pixels (a decompression-bomb stand-in: tiny on the wire)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _local_search(model: torch.nn.Module, image: Image.Image, index: Path, k: int) -> tuple[list[int], np.ndarray]:
    """What the index itself answers for an image (ids, scores): the server must agree."""
    from dinokit.retrieval.index import Index

    idx = Index.load(index)
    emb = Embedder(model, image_size=42)
    vec = emb.forward(emb.preprocess(image)[None])
    res = idx.search_vectors(vec, k)
    return [int(i) for i in res.ids[0]], res.scores[0]


# ------------------------------------------------------------------------------------ units (no server)


def test_bind_and_token_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("localhost")
    assert auth.is_loopback("127.0.0.2") and auth.is_loopback("[::1]")
    assert not auth.is_loopback("0.0.0.0") and not auth.is_loopback("192.168.1.5")
    assert not auth.is_loopback("example.com") and not auth.is_loopback("::")
    auth.check_bind("127.0.0.1", None)
    auth.check_bind("0.0.0.0", "t")
    with pytest.raises(auth.UnsafeBindError, match=r"refusing to listen on 0\.0\.0\.0 without a token"):
        auth.check_bind("0.0.0.0", None)
    monkeypatch.setenv(auth.TOKEN_ENV, "from-env")
    assert auth.read_token(None) == "from-env" and auth.read_token("cli") == "cli"
    monkeypatch.delenv(auth.TOKEN_ENV)
    assert auth.read_token(None) is None
    auth.check_write(None, None)
    auth.check_write("Bearer t", "t")
    for header, status in ((None, 401), ("Basic dDp0", 401), ("Bearer ", 401), ("Bearer x", 403), ("Bearer tt", 403)):
        with pytest.raises(auth.AuthError) as e:
            auth.check_write(header, "t")
        assert e.value.status == status


def test_decode_limits_and_box() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="JPEG")
    img = decode_image(buf.getvalue(), "a.jpg", max_pixels=1200)
    assert img.size == (40, 30) and img.mode == "RGB"
    with pytest.raises(ImageTooLarge, match="40x30 = 1200 pixels is over the limit of 1199"):
        decode_image(buf.getvalue(), "a.jpg", max_pixels=1199)
    with pytest.raises(ImageTooLarge):
        decode_image(_header_only_png(30_000, 30_000), "bomb.png")  # PIL's own bomb check, before decoding
    with pytest.raises(BadImage, match="not an image of an accepted type"):
        decode_image(b"%PDF-1.4 not an image", "x.pdf")
    with pytest.raises(BadImage, match="corrupt image"):
        decode_image(buf.getvalue()[:200], "cut.jpg")
    with pytest.raises(BadImage, match="empty file"):
        decode_image(b"", "e.png")
    # a JPEG may be decoded at reduced DCT scale, never below draft_to on either side; other formats never
    big = io.BytesIO()
    Image.new("RGB", (256, 200), (10, 200, 30)).save(big, format="JPEG")
    assert decode_image(big.getvalue(), "b.jpg").size == (256, 200)
    assert decode_image(big.getvalue(), "b.jpg", draft_to=84).size == (128, 100)
    assert decode_image(big.getvalue(), "b.jpg", draft_to=50).size == (64, 50)
    assert decode_image(big.getvalue(), "b.jpg", draft_to=101).size == (256, 200)
    png = io.BytesIO()
    Image.new("RGB", (256, 200)).save(png, format="PNG")
    assert decode_image(png.getvalue(), "b.png", draft_to=50).size == (256, 200)
    assert parse_box(None, (40, 30)) is None
    assert parse_box("[5, 4, 20.4, 100]", (40, 30)) == (5, 4, 20, 30)
    assert parse_box("[20, 10, 5, 0]", (40, 30)) == (5, 0, 20, 10)  # corners in any order
    for bad in ("[1, 2, 3]", "nope", "[50, 50, 60, 60]"):
        with pytest.raises(ValueError, match="box"):
            parse_box(bad, (40, 30))


def test_batcher_groups_concurrent_images_and_keeps_results(model: torch.nn.Module) -> None:
    emb = Embedder(model, image_size=42)
    x = torch.stack([emb.preprocess(Image.open(p)) for p in sorted((IMAGES / "val" / "Bag").glob("*.png"))[:8]])
    want = emb.forward(x)

    def run(max_batch: int) -> tuple[np.ndarray, list[int]]:
        sizes: list[int] = []

        async def main() -> np.ndarray:
            b = Batcher(emb, max_batch=max_batch, max_wait_ms=50, on_batch=lambda n, _s: sizes.append(n))
            await b.start()
            try:
                return np.stack(await asyncio.gather(*(b.embed(xi) for xi in x)))
            finally:
                await b.stop()

        return asyncio.run(main()), sizes

    # the split preprocessing gives what dinokit.embed (eval_transform + compute_features) gives
    paths = sorted((IMAGES / "val" / "Bag").glob("*.png"))[:8]
    ref = dinokit.embed(model, [str(p) for p in paths], num_workers=0).features.numpy()
    np.testing.assert_allclose(want, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    got, sizes = run(4)
    assert sizes == [4, 4]
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    got1, sizes1 = run(1)  # the per-request mode: one forward each
    assert sizes1 == [1] * 8
    np.testing.assert_allclose(got1, want, atol=1e-5)


def test_public_host_without_token_is_refused(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "dinokit.cli", "serve", str(tmp_path), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60, env=server_env())
    assert res.returncode == 1
    err = " ".join(res.stderr.split())
    assert "refusing to listen on 0.0.0.0 without a token" in err
    assert "Traceback" not in res.stderr and res.stdout == ""


# ------------------------------------------------------------------------------------ the server


def test_read_endpoints(server, base, model) -> None:
    from dinokit.models.backbone import fingerprint

    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        info = c.get("/info").json()
        assert set(info) == {"count", "dim", "kind", "model", "feature"}
        assert info["count"] == 403 and info["dim"] == 256 and info["kind"] == "flat" and info["feature"] == "cls"
        assert info["model"]["fingerprint"] == fingerprint(model)
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "/static/app.js" in page.text and "http" not in re.sub(r"<!--.*?-->", "", page.text, flags=re.S)
        assert c.get("/static/app.js").status_code == 200 and c.get("/static/style.css").status_code == 200
        spec = c.get("/openapi.json").json()
        assert {"/search", "/items", "/items/{item_id}", "/items/{item_id}/image", "/info"} <= set(spec["paths"])
        docs = c.get("/docs")  # Swagger UI from this server: works offline
        assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text
        assert c.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
        got = c.get("/items/0").json()
        assert got["id"] == 0 and got["path"].endswith(".png") and isinstance(got["metadata"], dict)
        img = c.get("/items/0/image")
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert img.content == (base["images"] / got["path"]).read_bytes()
        missing = c.get("/items/99999")
        assert missing.status_code == 404 and set(missing.json()) == {"error"}


def test_search_by_image_matches_the_index(server, base, model) -> None:
    with server.client() as c:
        r = c.post("/search", files={"file": ("bag.png", _png(BAG))}, data={"k": "5"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["results"]) == 5 and body["took_ms"] > 0
        assert set(body["results"][0]) == {"id", "path", "score", "metadata"}
        ids, scores = _local_search(model, Image.open(BAG), base["index"], 5)
        assert [h["id"] for h in body["results"]] == ids
        np.testing.assert_allclose([h["score"] for h in body["results"]], scores, atol=1e-5)
        assert all(a["score"] >= b["score"] for a, b in zip(body["results"], body["results"][1:], strict=False))
        # a region: the server crops [x0, y0, x1, y1] before preprocessing
        r = c.post("/search", files={"file": ("bag.png", _png(BAG))}, data={"k": "3", "box": "[0, 0, 14, 20]"})
        ids, scores = _local_search(model, Image.open(BAG).convert("RGB").crop((0, 0, 14, 20)), base["index"], 3)
        assert [h["id"] for h in r.json()["results"]] == ids
        np.testing.assert_allclose([h["score"] for h in r.json()["results"]], scores, atol=1e-5)


def test_search_by_vector_and_id_and_bad_requests(server) -> None:
    with server.client() as c:
        by_id = c.post("/search", json={"id": 7, "k": 4}).json()["results"]
        assert by_id[0]["id"] == 7 and by_id[0]["score"] == pytest.approx(1.0, abs=1e-5)
        img = c.get("/items/7/image").content
        by_img = c.post("/search", files={"file": ("q.png", img)}, data={"k": "4"}).json()["results"]
        assert [h["id"] for h in by_img] == [h["id"] for h in by_id]
        vec = np.random.default_rng(1).normal(size=256)
        by_vec = c.post("/search", json={"vector": vec.tolist(), "k": 3}).json()["results"]
        assert len(by_vec) == 3 and by_vec[0]["score"] >= by_vec[2]["score"]
        bad = {
            422: [{"vector": [1.0, 2.0]}, {"id": 1, "vector": vec.tolist()}, {"k": 3}, {"id": 1, "k": 0},
                  {"id": 1, "k": "many"}, {"id": "x"}, {"id": 1, "filter": [1]}, {"vector": [0.0] * 256}],
            404: [{"id": 99999}, {"id": -1}],
        }
        for status, bodies in bad.items():
            for b in bodies:
                r = c.post("/search", json=b)
                assert r.status_code == status, (b, r.text)
                assert set(r.json()) == {"error"} and "\n" not in r.json()["error"]
        assert c.post("/search", content=b"{", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/search", content=b"hello", headers={"content-type": "text/plain"}).status_code == 415
        r = c.post("/search", files={"file": ("x.txt", b"not an image")})
        assert r.status_code == 422 and "not an image" in r.json()["error"]


def test_writes_need_the_token(server) -> None:
    with server.client() as anon, server.client("wrong") as wrong:
        r = anon.post("/items", files=[("files", ("a.png", _png(BAG)))])
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "error" in r.json()
        assert wrong.post("/items", files=[("files", ("a.png", _png(BAG)))]).status_code == 403
        assert anon.delete("/items/1").status_code == 401
        assert wrong.delete("/items/1").status_code == 403
        assert anon.get("/items/1").status_code == 200  # reads stay open


def test_add_get_image_filter_delete(server) -> None:
    with server.client(TOKEN) as c:
        before = c.get("/info").json()["count"]
        files = [("files", ("bag.png", _png(BAG))), ("files", ("notes.txt", b"hello")),
                 ("files", ("boot.png", _png(BOOT)))]
        meta = [{"sku": "b-1", "shop": "x"}, {}, {"sku": "b-2", "shop": "x"}]
        r = c.post("/items", files=files, data={"metadata": json.dumps(meta)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["ids"]) == 2 and body["skipped"] == [
            {"name": "notes.txt", "reason": "not an image of an accepted type (JPEG, PNG, WEBP, GIF, BMP, TIFF)"}]
        bag_id, boot_id = body["ids"]
        assert c.get("/info").json()["count"] == before + 2
        item = c.get(f"/items/{bag_id}").json()
        assert item["metadata"] == meta[0] and item["path"].endswith(".png")
        assert c.get(f"/items/{bag_id}/image").content == _png(BAG)
        hits = c.post("/search", json={"id": boot_id, "k": 10, "filter": {"shop": "x"}}).json()["results"]
        assert [h["id"] for h in hits] == [boot_id, bag_id] and hits[1]["metadata"]["sku"] == "b-1"
        hits = c.post("/search", files={"file": ("q.png", _png(BAG))},
                      data={"k": "10", "filter": json.dumps({"sku": "b-1"})}).json()["results"]
        assert [h["id"] for h in hits] == [bag_id] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert c.delete(f"/items/{bag_id}").json() == {"deleted": bag_id}
        assert c.get(f"/items/{bag_id}").status_code == 404
        assert c.get(f"/items/{bag_id}/image").status_code == 404
        assert c.delete(f"/items/{bag_id}").status_code == 404
        hits = c.post("/search", json={"id": boot_id, "k": 10, "filter": {"shop": "x"}}).json()["results"]
        assert [h["id"] for h in hits] == [boot_id]
        assert c.get("/info").json()["count"] == before + 1
        bad = c.post("/items", files=files[:1], data={"metadata": "[{}, {}]"})
        assert bad.status_code == 422 and "one per file" in bad.json()["error"]


def test_upload_limits(server) -> None:
    big = b"\0" * (1 * 2**20 + 10)  # the server runs with --max-upload-mb 1
    with server.client(TOKEN) as c:
        r = c.post("/search", files={"file": ("big.png", big)})
        assert r.status_code == 413 and "upload limit" in r.json()["error"]

        def chunks():  # no Content-Length: the server must count the bytes itself
            yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
            for _ in range(20):
                yield b"\0" * 65536

        r = c.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        bomb = _header_only_png(7000, 7000)  # 49 M pixels: over the 40 M default, declared in 60 bytes
        r = c.post("/search", files={"file": ("bomb.png", bomb)})
        assert r.status_code == 422 and "over the limit" in r.json()["error"]
        r = c.post("/items", files=[("files", ("bomb.png", bomb))])
        assert r.status_code == 422
        assert c.get("/healthz").status_code == 200


def test_traversal_and_symlink_escapes_are_refused(server, base) -> None:
    with server.client() as c:
        for item_id in base["escape_ids"]:
            if item_id >= 0:
                r = c.get(f"/items/{item_id}/image")
                assert r.status_code == 404 and r.headers["content-type"] == "application/json", item_id
        for path in ("/items/..%2F..%2Fetc%2Fpasswd/image", "/items/0/..%2F..%2F..%2Fpyproject.toml",
                     "/static/..%2F..%2F..%2Fpyproject.toml", "/static/../app.py", "/static/%2e%2e/app.py",
                     "/items/-1/image"):
            r = c.get(path)
            assert r.status_code in (404, 422), path
            assert b"[project]" not in r.content and b"import" not in r.content


def test_client(server) -> None:
    with dinokit.Client(server.url, token=TOKEN) as client:
        assert client.info()["dim"] == 256
        by_path = client.search(str(BAG), k=3)
        assert by_path.ids.shape == (1, 3) and by_path.scores.dtype == np.float32
        for other in (Image.open(BAG), BAG.read_bytes(), BAG):
            res = client.search(other, k=3)
            assert res.ids.tolist() == by_path.ids.tolist()
        first = int(by_path.ids[0, 0])
        assert client.search(first, k=2).ids[0, 0] == first
        vec = np.random.default_rng(3).normal(size=256).astype(np.float32)
        assert client.search(vec, k=2).ids.shape == (1, 2)
        assert client.search(torch.from_numpy(vec), k=2).ids.tolist() == client.search(vec.tolist(), k=2).ids.tolist()
        region = client.search(BAG, k=3, box=[0, 0, 14, 14])
        assert region.ids.shape == (1, 3)
        added = client.add([BOOT, BAG], metadata=[{"sku": "c1"}, {"sku": "c2"}])
        assert len(added.ids) == 2 and added.skipped == []
        assert client.get(added.ids[0])["metadata"] == {"sku": "c1"}
        assert client.image(added.ids[1]) == BAG.read_bytes()
        padded = client.search(BAG, k=5, filter={"sku": "c2"})  # one match: the rest is padding
        assert padded.ids[0].tolist() == [added.ids[1], -1, -1, -1, -1]
        assert padded.paths[0, 1] is None and np.isnan(padded.scores[0, 1])
        assert client.remove(added.ids[0]) == added.ids[0]
        with pytest.raises(KeyError):
            client.get(added.ids[0])
    with dinokit.Client(server.url, token="bad") as wrong, pytest.raises(RuntimeError, match="HTTP 403"):
        wrong.add([BAG])
    from test_serve_helpers import free_port

    with dinokit.Client(f"http://127.0.0.1:{free_port()}", timeout=5) as nobody, \
            pytest.raises(ConnectionError, match="cannot reach the server"):
        nobody.info()


def _burst(url: str, n: int, image: bytes) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            barrier.wait(timeout=30)
            r = c.post("/search", files={"file": ("q.png", image)}, data={"k": "3"})
            out[i] = [h["id"] for h in r.json()["results"]]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def _batch_counts(url: str) -> tuple[float, float]:
    """(forwards, forwards of exactly one image) from /metrics."""
    text = httpx.get(url + "/metrics").text
    total = float(re.search(r"^dinokit_batch_size_count (\S+)$", text, re.M).group(1))
    ones = float(re.search(r'^dinokit_batch_size_bucket\{le="1.0"\} (\S+)$', text, re.M).group(1))
    return total, ones


def test_concurrent_image_queries_share_a_forward(server) -> None:
    image = _png(BAG)
    with server.client() as c:
        want = [h["id"] for h in c.post("/search", files={"file": ("q.png", image)}, data={"k": "3"}).json()["results"]]
    total0, ones0 = _batch_counts(server.url)
    for _ in range(3):  # bounded: a loaded machine may need a second burst to overlap
        results = _burst(server.url, 12, image)
        assert all(r == want for r in results)
        total, ones = _batch_counts(server.url)
        if (total - total0) - (ones - ones0) > 0:
            break
    forwards, queries = total - total0, 12
    assert forwards - (ones - ones0) > 0, "no forward held more than one image"
    assert forwards < queries * 3
    text = httpx.get(server.url + "/metrics").text
    assert re.search(r'^dinokit_requests_total\{method="POST",route="/search",status="200"\} \d+', text, re.M)
    assert re.search(r"^dinokit_items \d+", text, re.M)
    assert 'dinokit_request_seconds_bucket{le="0.005",route="/search"}' in text


@pytest.mark.slow
def test_kill9_while_writing_loses_no_acknowledged_item(base, tmp_path: Path) -> None:
    folder = copy_index(base["index"], tmp_path / "index")
    acked: dict[int, dict[str, int]] = {}
    stop = threading.Event()
    lock = threading.Lock()

    with serve(folder, "--token", TOKEN, log_dir=tmp_path) as s:
        start_count = httpx.get(s.url + "/info").json()["count"]

        def writer(w: int) -> None:
            with s.client(TOKEN) as c:
                for i in range(40):  # bounded in count; the kill ends it sooner
                    if stop.is_set():
                        return
                    meta = {"writer": w, "n": i}
                    try:
                        r = c.post("/items", files=[("files", (f"w{w}-{i}.png", _png(BAG)))],
                                   data={"metadata": json.dumps([meta])})
                    except httpx.HTTPError:
                        return  # the server is gone: this write was never acknowledged
                    if r.status_code == 200:
                        with lock:
                            acked[r.json()["ids"][0]] = meta

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 12 and time.monotonic() < deadline:
            time.sleep(0.02)
        s.kill9()  # mid-stream: writers are still sending
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert len(acked) >= 12
    with serve(folder, "--token", TOKEN, log_dir=tmp_path) as s, s.client() as c:
        for item_id, meta in acked.items():
            r = c.get(f"/items/{item_id}")
            assert r.status_code == 200, (item_id, r.text)
            assert r.json()["metadata"] == meta
            assert c.get(f"/items/{item_id}/image").content == _png(BAG)
        assert c.get("/info").json()["count"] >= start_count + len(acked)
        assert len(set(acked)) == len(acked)


def test_cors_is_off_unless_asked(server, base, model, tmp_path: Path) -> None:
    from dinokit.serve.app import ServeConfig, create_app

    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with server.client() as c:
        assert "access-control-allow-origin" not in c.get("/healthz", headers=evil).headers
        assert "access-control-allow-origin" not in c.options("/search", headers=evil).headers
    app = create_app(ServeConfig(index=copy_index(base["index"], tmp_path / "index"), cors=("https://app.example",)),
                     model=model)

    async def calls() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            ok = await c.options("/search", headers={**evil, "Origin": "https://app.example"})
            return ok, await c.options("/search", headers=evil)

    ok, other = asyncio.run(calls())
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers

    async def search() -> httpx.Response:  # POST /search takes the short lane: CORS and error mapping still apply
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/search", content=b'{"vector": [1,', headers={"Origin": "https://app.example",
                                                                               "Content-Type": "application/json"})

    r = asyncio.run(search())
    assert r.status_code == 422 and r.json() == {"error": "the body is not valid JSON"}
    assert r.headers["access-control-allow-origin"] == "https://app.example"


def _write_v1_copy(src: Path, images: Path, dst: Path, model: torch.nn.Module, n: int) -> None:
    """The first ``n`` items of the store ``src`` as a folder of the old format (index.faiss + meta.json +
    paths.json), recording ``model`` like an old ``dinokit index build`` did."""
    import faiss

    from dinokit.models.backbone import identity
    from dinokit.retrieval.index import Index

    store = Index.load(src)
    x = np.stack([store.vector(i) for i in range(n)])
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    dst.mkdir()
    faiss.write_index(flat, str(dst / "index.faiss"))
    (dst / "paths.json").write_text(json.dumps([store.get(i)["path"] for i in range(n)]))
    meta = {"format_version": 1, "kind": "flat", "knobs": {}, "count": n, "dim": x.shape[1], "feature_kind": "cls",
            "image_size": 42, "root": str(images), "model": identity(model), "model_source": str(MODEL),
            "metric": "inner_product"}
    (dst / "meta.json").write_text(json.dumps(meta))


def test_old_format_index_is_served_read_only(base, model, tmp_path: Path) -> None:
    from dinokit.serve.app import ServeConfig, create_app

    old = tmp_path / "old"
    _write_v1_copy(base["index"], base["images"], old, model, 20)
    app = create_app(ServeConfig(index=old, token=TOKEN), model=model)
    auth_header = {"Authorization": f"Bearer {TOKEN}"}

    async def calls() -> dict[str, httpx.Response]:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return {
                "info": await c.get("/info"),
                "by_id": await c.post("/search", json={"id": 3, "k": 2}),
                "image": await c.get("/items/3/image"),
                "anon_add": await c.post("/items", files=[("files", ("a.png", _png(BAG)))]),
                "add": await c.post("/items", files=[("files", ("a.png", _png(BAG)))], headers=auth_header),
                "delete": await c.delete("/items/3", headers=auth_header),
                "after": await c.get("/items/3"),
            }

    r = asyncio.run(calls())
    assert r["info"].json()["count"] == 20
    assert r["by_id"].json()["results"][0]["id"] == 3
    assert r["image"].content == (base["images"] / _stored_path(base["index"], 3)).read_bytes()
    assert r["anon_add"].status_code == 401  # the token is checked first
    for name in ("add", "delete"):
        assert r[name].status_code == 409, r[name].text
        assert "dinokit index migrate" in r[name].json()["error"] and "\n" not in r[name].json()["error"]
    assert r["after"].status_code == 200 and not (old / "files").exists()


def _stored_path(folder: Path, item_id: int) -> str:
    from dinokit.retrieval.index import Index

    return str(Index.load(folder).get(item_id)["path"])


@pytest.mark.slow
def test_server_and_cli_writer_on_one_folder_lose_nothing(base, tmp_path: Path) -> None:
    """`dinokit index add` in another process while the server takes uploads: every item of both is there."""
    folder = copy_index(base["index"], tmp_path / "index")
    extra = tmp_path / "extra"
    extra.mkdir()
    for cls in ("Sandal", "Ankle boot"):
        for p in sorted((IMAGES / "val" / cls).glob("*.png")):
            shutil.copy(p, extra / f"{cls[:3]}-{p.name}")
    n_extra = len(list(extra.iterdir()))
    acked: dict[int, dict[str, int]] = {}
    done = threading.Event()
    with serve(folder, "--token", TOKEN, log_dir=tmp_path) as s:
        start_count = httpx.get(s.url + "/info").json()["count"]

        def writer(w: int) -> None:
            with s.client(TOKEN) as c:
                for i in range(30):  # bounded; stops once the other process is done
                    if done.is_set() and i >= 3:
                        return
                    meta = {"writer": w, "n": i}
                    r = c.post("/items", files=[("files", (f"w{w}-{i}.png", _png(BAG)))],
                               data={"metadata": json.dumps([meta])})
                    assert r.status_code == 200, r.text
                    acked[r.json()["ids"][0]] = meta

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        cli = subprocess.run([sys.executable, "-m", "dinokit.cli", "index", "add", str(folder), str(extra),
                              "--workers", "0"], capture_output=True, text=True, timeout=180, env=server_env())
        done.set()
        for t in threads:
            t.join(timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert f"added {n_extra} images (0 skipped)" in " ".join(cli.stderr.split())  # messages: stderr
        with s.client() as c:
            assert c.get("/info").json()["count"] == start_count + len(acked) + n_extra  # no restart needed
            for item_id, meta in acked.items():
                assert c.get(f"/items/{item_id}").json()["metadata"] == meta
            for p in sorted(extra.iterdir())[::4]:  # the other process's items: found, served from its root
                hit = c.post("/search", files={"file": (p.name, p.read_bytes())}, data={"k": "1"}).json()["results"][0]
                assert hit["path"].endswith(p.name) and hit["score"] == pytest.approx(1.0, abs=1e-5)
                assert hit["id"] not in acked
                assert c.get(f"/items/{hit['id']}/image").content == p.read_bytes()
    assert len(acked) >= 6
