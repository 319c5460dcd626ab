"""``dinokit serve INDEX``: the HTTP search service (FastAPI + uvicorn) over an index folder."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import typer

from dinokit.cli._common import _fail, app, console


@app.command("serve")
def serve_cmd(
    index: Path = typer.Argument(..., help="Index folder (from `dinokit index build`)."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="Model to embed image queries (default: the one the index records)."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on. Anything but loopback needs --token."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    token: str | None = typer.Option(None, "--token",
                                     help="Bearer token that writes need (default: $DINOKIT_TOKEN)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body (413 above)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Largest image in pixels (422 above)."),
    cors: list[str] | None = typer.Option(None, "--cors", help="Allow browser calls from ORIGIN (repeatable); "
                                          "off by default."),
    batching: bool = typer.Option(True, "--batching/--no-batching",
                                  help="Share one forward among image queries arriving together."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most images per forward."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="Longest wait for a batch to fill."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
) -> None:
    """Serve INDEX over HTTP: search by image, region, id or vector; add, get and delete items; a web page at /.

    Binds 127.0.0.1 unless --host says otherwise; a non-loopback host without a token is refused.

    Example: dinokit serve photos.index --port 8000 --token s3cret   (then open http://127.0.0.1:8000/)
    """
    from dinokit.serve.auth import check_bind, read_token

    try:
        token = read_token(token)  # $DINOKIT_TOKEN is read here, at start
        check_bind(host, token)
    except ValueError as exc:
        _fail(str(exc))
    if not index.is_dir():
        _fail(f"{index}: no such index folder")
    # faiss logs which CPU build it loads at INFO on every import: noise on a command line
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import uvicorn

    from dinokit.serve.app import ServeConfig, create_app

    config = ServeConfig(index=index, model=model, token=token, max_upload_mb=max_upload_mb,
                         max_pixels=max_pixels, cors=tuple(cors or ()), batching=batching,
                         max_batch=max_batch, max_wait_ms=max_wait_ms, device=device)
    try:
        server_app = create_app(config)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"serving {index} on http://{host}:{port} (writes {'need the token' if token else 'open: loopback'})",
                  highlight=False)
    # the model, torch and the index are ~400k long-lived objects: a full garbage collection walks them
    # all (~0.1-0.3 s, a p99 spike for every query waiting meanwhile); frozen, it walks only new ones
    gc.collect()
    gc.freeze()
    # proxy_headers off: one ASGI layer less per request (nothing here reads the client address)
    uvicorn.run(server_app, host=host, port=port, log_level="warning", access_log=False, proxy_headers=False,
                timeout_graceful_shutdown=5)
