"""The FastAPI app of ``dinokit serve``: the endpoints of DESIGN.md "HTTP API of dinokit serve".

:func:`create_app` opens the index folder (through :mod:`dinokit.serve.backend`), loads the model
(the one the index records, or ``model=``; its fingerprint must match the index) and returns the
app; run it with uvicorn. Image queries go through the dynamic batcher; vector and id queries go
straight to the index on worker threads. Every error is ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import mimetypes
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from dinokit.devices import usable_cores
from dinokit.serve import auth, fastjson
from dinokit.serve.backend import Backend, Hit, ReadOnlyIndexError
from dinokit.serve.batching import Batcher, Embedder, SearchBatcher
from dinokit.serve.limits import (
    DEFAULT_MAX_PIXELS,
    FORMATS,
    BodyLimit,
    ImageTooLarge,
    decode_image,
    parse_box,
)
from dinokit.serve.metrics import Metrics, MetricsMiddleware

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_K = 1000
MAX_FILES = 256
# the page's scripts, styles and images all come from this server: nothing from a CDN can run
_PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server (the ``dinokit serve`` options)."""

    index: Path
    model: str | None = None  # default: the source recorded in the index
    token: str | None = None
    max_upload_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    cors: tuple[str, ...] = ()
    batching: bool = True
    max_batch: int = 32
    max_wait_ms: float = 5.0
    device: str | None = None


class _State:
    """What the endpoints share: config, index backend, embedder, batcher, metrics."""

    def __init__(self, config: ServeConfig, backend: Backend, embedder: Embedder, metrics: Metrics) -> None:
        self.config = config
        self.backend = backend
        self.embedder = embedder
        self.metrics = metrics
        self.batcher = Batcher(embedder, max_batch=config.max_batch if config.batching else 1,
                               max_wait_ms=config.max_wait_ms if config.batching else 0.0,
                               on_batch=metrics.observe_batch)
        self.searcher = SearchBatcher(backend.search_vectors)
        # uploads are decoded on as many threads as cores (not one of Starlette's 40 per request: 32
        # concurrent decodes would only fight over the GIL and the cores the model needs)
        self.decoders = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="dinokit-decode")

    async def prepare(self, data: bytes, name: str, box: str | None) -> Any:
        """:func:`_prepare` on a decode thread."""
        return await asyncio.get_running_loop().run_in_executor(self.decoders, _prepare, self, data, name, box)


def load_model_for(backend: Backend, source: str | Any | None) -> Any:
    """The model to embed queries with: ``source`` (a loaded module or what ``dinokit.load`` takes), else
    the one the index records; refused (ValueError) when its fingerprint differs from the index's."""
    from dinokit.hub import load
    from dinokit.models.backbone import fingerprint

    info = backend.model_info
    src = source if source is not None else info.get("source")
    if src is None:
        raise ValueError(f"{backend.folder}: the index does not record its model; pass --model SRC")
    model = load(str(src)) if isinstance(src, (str, os.PathLike)) else src
    want = info.get("fingerprint")
    if want:
        got = fingerprint(model)
        if got != want:
            raise ValueError(f"model mismatch: the index was built with {info.get('name')} (fingerprint {want}) "
                             f"but {src if isinstance(src, str) else 'the given model'} has fingerprint {got}")
    return model


def create_app(config: ServeConfig, *, model: Any = None) -> FastAPI:
    """The app for ``config``; ``model`` (an nn.Module) skips loading the model from its source."""
    if config.max_upload_mb <= 0 or config.max_pixels <= 0:
        raise ValueError("--max-upload-mb and the pixel limit must be positive")
    backend = Backend(config.index)
    model = load_model_for(backend, model if model is not None else config.model)
    embedder = Embedder(model, feature=backend.feature, image_size=backend.image_size, device=config.device)
    state = _State(config, backend, embedder, Metrics(lambda: backend.count))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.batcher.start()
        await state.searcher.start()
        log.info("serving %s: %d items, %s, batching %s", config.index, backend.count, backend.kind,
                 f"up to {config.max_batch} in {config.max_wait_ms} ms" if config.batching else "off")
        yield
        await state.batcher.stop()
        await state.searcher.stop()
        state.decoders.shutdown(wait=True)

    app = _ServeApp(title="dinokit serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Image search over DINO features: search by image, region, id or vector; "
                              "add, get and delete items.")
    app.state.dinokit = state
    _add_error_handlers(app)
    _add_routes(app, state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_docs(app)
    cors: dict[str, Any] = {"allow_origins": list(config.cors), "allow_methods": ["GET", "POST", "DELETE"],
                            "allow_headers": ["Authorization", "Content-Type"]}
    max_bytes = int(config.max_upload_mb * 2**20)
    if config.cors:
        app.add_middleware(CORSMiddleware, **cors)
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    # POST /search through the same middlewares (metrics, upload limit, CORS) but not FastAPI's layers
    lane: Any = SearchLane(state)
    if config.cors:
        lane = CORSMiddleware(lane, **cors)
    app.search_lane = MetricsMiddleware(BodyLimit(lane, max_bytes=max_bytes), state.metrics)
    app.search_route = next(r for r in app.routes if getattr(r, "path", None) == "/search")
    return app


class _ServeApp(FastAPI):
    """FastAPI with one short cut: ``POST /search``, the hot path, goes straight to :class:`SearchLane`.

    A vector query's FAISS search costs ~0.2 ms of CPU; FastAPI's per-request layers (telemetry, body
    limit, exception middlewares, routing, dependency solving, the response class) cost more than
    that, so the search endpoint is a plain ASGI app wrapped in the server's own middlewares. The
    routed ``/search`` (same code) stays for the OpenAPI page.
    """

    search_lane: Any = None
    search_route: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (self.search_lane is not None and scope["type"] == "http" and scope["path"] == "/search"
                and scope["method"] == "POST"):
            scope["app"] = self  # as Starlette sets it (a bad multipart body is then a 400, not a 500)
            scope["route"] = self.search_route  # the metrics label
            await self.search_lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


class SearchLane:
    """``POST /search`` as a plain ASGI app: :func:`_search`, errors mapped by :func:`_status_of`."""

    def __init__(self, state: _State) -> None:
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers: dict[str, str] | None = None
        try:
            body, status = await _search(self.state, Request(scope, receive)), 200
        except ClientDisconnect:  # gone, or cut at the upload limit (BodyLimit has answered 413)
            return
        except Exception as e:
            status, message, headers = _status_of(e, "POST /search")
            body = fastjson.dumps({"error": _one_line(message)})
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def _add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI served by this server (swagger-ui-bundle-v2), so the docs work offline;
    FastAPI's default page (scripts from a CDN) only when that package is missing."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # optional: the API works without it
        swagger_ui_path = None
    assets: dict[str, Any] = {}  # get_swagger_ui_html keyword arguments (URLs here)
    if swagger_ui_path is not None:
        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")
        assets = {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js", "swagger_css_url": "/docs-assets/swagger-ui.css",
                  "swagger_favicon_url": "/docs-assets/favicon-32x32.png"}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="dinokit serve: API", **assets)


# ------------------------------------------------------------------------------------ errors


def _one_line(text: object) -> str:
    return " ".join(str(text).split()) or "error"


def _error(status: int, message: object, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": _one_line(message)}, status_code=status, headers=headers)


def _status_of(e: Exception, what: str) -> tuple[int, object, dict[str, str] | None]:
    """(status, message, headers) of the ``{"error"}`` answer to ``e``: the one mapping of exceptions to
    statuses, used by the app's exception handlers and by the ``POST /search`` lane. ``what`` (method
    and path) names the request in the log of a 500."""
    if isinstance(e, HTTPException):
        return e.status_code, e.detail, dict(e.headers or {})
    if isinstance(e, auth.AuthError):
        return e.status, e, {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    if isinstance(e, ReadOnlyIndexError):
        return 409, e, None
    if isinstance(e, KeyError):
        return 404, e.args[0] if e.args else "not found", None
    if isinstance(e, ValueError):
        return 422, e, None
    log.error("%s failed: %s: %s", what, type(e).__name__, e, exc_info=e)
    return 500, "internal error (the server log has the details)", None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = (e.errors() or [{}])[0]
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {err.get('msg', 'invalid request')}" if where else err.get("msg"))

    async def mapped(request: Request, e: Exception) -> JSONResponse:
        return _error(*_status_of(e, f"{request.method} {request.url.path}"))

    for kind in (HTTPException, auth.AuthError, ReadOnlyIndexError, KeyError, ValueError, Exception):
        app.add_exception_handler(kind, mapped)


# ------------------------------------------------------------------------------------ request parsing


def _k(value: Any) -> int:
    try:
        k = int(10 if value is None or value == "" else value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"k={value!r}: expected an integer") from e
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={k}: must be between 1 and {MAX_K}")
    return k


def _filter(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"filter {value!r}: not JSON") from e
    if not isinstance(value, dict) or any(isinstance(v, (dict, list)) for v in value.values()):
        raise ValueError("filter: expected a JSON object of field: value pairs (values compared for equality)")
    return value or None


def _vector(value: Any, dim: int) -> np.ndarray:
    """A JSON list -> a unit float32 vector (D,); ValueError for the wrong length, NaN or zeros."""
    try:
        x = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError("vector: expected a list of numbers") from e
    if x.shape[0] != dim:
        raise ValueError(f"vector has {x.shape[0]} numbers, the index holds dimension {dim}")
    norm = math.sqrt(float(np.square(x, dtype=np.float64).sum()))  # NaN or inf when an entry is; 0 for zeros
    if not math.isfinite(norm) or norm == 0:
        raise ValueError("vector: must be finite and non-zero")
    return x / norm


def _results(hits: list[Hit], t0: float) -> bytes:
    """The ``POST /search`` answer as JSON bytes (each Hit's fields in order: id, path, score, metadata)."""
    return fastjson.dumps({"results": hits, "took_ms": round((time.perf_counter() - t0) * 1e3, 3)})


def _prepare(state: _State, data: bytes, name: str, box: str | None) -> Any:
    """Upload bytes -> the model input (3, S, S): decode (limits checked), crop to ``box``, preprocess."""
    # a box is in the upload's pixels: only a whole-image query may be decoded at reduced scale
    image = decode_image(data, name, state.config.max_pixels, draft_to=None if box else state.embedder.draft_to)
    crop = parse_box(box, image.size)
    if crop is not None:
        image = image.crop(crop)
    return state.embedder.preprocess(image)


# ------------------------------------------------------------------------------------ routes

_SEARCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "k": {"type": "integer", "default": 10},
        "filter": {"type": "string", "description": "JSON object, e.g. {\"sku\": \"b\"}"},
        "box": {"type": "string", "description": "JSON [x0, y0, x1, y1] in pixels of the image"}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "vector": {"type": "array", "items": {"type": "number"}}, "id": {"type": "integer"},
        "k": {"type": "integer", "default": 10}, "filter": {"type": "object"}}}}}}}
_ITEMS_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "metadata": {"type": "string", "description": "JSON list, one object per file"}}}}}}}


def _add_routes(app: FastAPI, state: _State) -> None:
    bearer = HTTPBearer(auto_error=False, description="the server's --token")

    def writer(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        auth.check_write(request.headers.get("authorization"), state.config.token)
        state.backend.check_writable()  # before any upload is read or stored

    @app.post("/search", openapi_extra=_SEARCH_BODY, summary="Search by image (multipart), vector or id (JSON)")
    async def search(request: Request) -> Response:
        # served by SearchLane (see _ServeApp); reached only when the app is mounted under a prefix
        return Response(await _search(state, request), media_type="application/json")

    @app.post("/items", openapi_extra=_ITEMS_BODY, dependencies=[Depends(writer)],
              summary="Add images with optional metadata; answers once they are durable")
    async def add_items(request: Request) -> JSONResponse:
        return JSONResponse(await _add_items(state, request))

    @app.get("/items/{item_id}", summary="An item's path and metadata")
    async def get_item(item_id: int) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(state.backend.get, item_id))

    @app.get("/items/{item_id}/image", summary="An item's image file")
    async def get_image(item_id: int) -> FileResponse:
        from dinokit.data.images import is_image_file

        path = await run_in_threadpool(state.backend.file_of, item_id)
        if path is None or not is_image_file(path):  # outside the index's folders, missing, or not an image
            raise HTTPException(404, f"item {item_id}: no image file")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"X-Content-Type-Options": "nosniff"})

    @app.delete("/items/{item_id}", dependencies=[Depends(writer)], summary="Delete an item")
    async def delete_item(item_id: int) -> JSONResponse:
        await run_in_threadpool(state.backend.remove, item_id)
        return JSONResponse({"deleted": item_id})

    @app.get("/info", summary="Live items, dimension, index kind, model, feature kind")
    async def info() -> JSONResponse:
        return JSONResponse(state.backend.info())

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff"})


async def _search(state: _State, request: Request) -> bytes:
    """``POST /search``: the JSON answer (bytes), or an exception that maps to the error answer."""
    t0 = time.perf_counter()
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        return await _search_upload(state, request, t0)
    if ctype.startswith("application/json"):
        return await _search_json(state, await request.body(), t0)
    raise HTTPException(415, "send multipart/form-data with a file, or JSON with a vector or an id")


async def _search_upload(state: _State, request: Request, t0: float) -> bytes:
    async with request.form(max_files=1, max_fields=8) as form:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise ValueError("multipart search needs a 'file' field holding an image")
        k, filt = _k(form.get("k")), _filter(form.get("filter"))
        data = await file.read()
        box = form.get("box")
    if isinstance(box, UploadFile):
        raise ValueError("box: expected a JSON list [x0, y0, x1, y1] of pixel coordinates, not a file")
    x = await state.prepare(data, file.filename or "file", box)
    vec = await state.batcher.embed(x)
    return _results(await state.searcher.search(vec, k, filt), t0)


async def _search_json(state: _State, raw: bytes, t0: float) -> bytes:
    try:
        body = fastjson.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError("the body is not valid JSON") from e
    if not isinstance(body, dict) or ("vector" in body) == ("id" in body):
        raise ValueError('JSON search needs exactly one of "vector" or "id"')
    k, filt = _k(body.get("k")), _filter(body.get("filter"))
    if "id" in body:
        if not isinstance(body["id"], int) or isinstance(body["id"], bool):
            raise ValueError(f"id {body['id']!r}: expected an integer")
        hits = await run_in_threadpool(state.backend.search_by_id, body["id"], k, filt)
    else:
        hits = await state.searcher.search(_vector(body["vector"], state.backend.dim), k, filt)
    return _results(hits, t0)


def _metadata_list(text: Any, n: int) -> list[dict[str, Any]]:
    if text is None or text == "":
        return [{} for _ in range(n)]
    try:
        meta = json.loads(str(text))
    except json.JSONDecodeError as e:
        raise ValueError("metadata: not JSON (expected a list with one object per file)") from e
    if not isinstance(meta, list) or len(meta) != n or not all(isinstance(m, dict) for m in meta):
        raise ValueError(f"metadata: expected a JSON list of {n} object(s), one per file")
    return meta


async def _add_items(state: _State, request: Request) -> dict[str, Any]:
    """Decode every upload (bombs refuse the request), store the good ones, embed, add; skipped files listed."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "send multipart/form-data with one or more 'files'")
    form = await request.form(max_files=MAX_FILES, max_fields=8)
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise ValueError("no 'files' in the request")
    meta = _metadata_list(form.get("metadata"), len(files))
    good: list[tuple[str, bytes, Any, dict[str, Any]]] = []
    skipped: list[dict[str, str]] = []
    for f, m in zip(files, meta, strict=True):
        name = f.filename or "file"
        data = await f.read()
        try:
            x = await state.prepare(data, name, None)
        except ImageTooLarge:
            raise
        except ValueError as e:
            skipped.append({"name": name, "reason": _one_line(e).removeprefix(f"{name}: ")})
            continue
        good.append((name, data, x, m))
    if not good:
        return {"ids": [], "skipped": skipped}
    feats = await state.batcher.embed_many([x for _, _, x, _ in good])
    paths = await run_in_threadpool(_store_files, state.backend.uploads, [(n, d) for n, d, _, _ in good])
    ids, more = await run_in_threadpool(state.backend.add, feats, paths, [m for *_, m in good])
    skipped.extend({"name": n, "reason": r} for n, r in more)
    return {"ids": ids, "skipped": skipped}


def _store_files(folder: Path, files: list[tuple[str, bytes]]) -> list[str]:
    """Write uploads durably under ``folder`` with unique safe names; returns their absolute paths."""
    out = []
    for name, data in files:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).stem)[:60] or "image"
        suffix = _suffix_of(data)
        path = folder / f"{uuid.uuid4().hex[:12]}_{stem}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        out.append(str(path.absolute()))
    fd = os.open(folder, os.O_RDONLY)  # make the new names durable before the index refers to them
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return out


def _suffix_of(data: bytes) -> str:
    """The file suffix of the image format the bytes hold (already verified by decode_image)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data), formats=FORMATS) as im:
        return _SUFFIXES[str(im.format)]


_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
