"""Limits on what clients send: request bytes (413), image pixels (422) and image types.

:class:`BodyLimit` is a plain ASGI middleware: it refuses a declared ``Content-Length`` over the
limit before reading anything, and counts the bytes of bodies sent without one (chunked), so the
limit holds whatever the client claims. :func:`decode_image` opens only the formats listed in
:data:`FORMATS`, checks the pixel count from the header before decoding (decompression bombs) and
verifies the file.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from PIL import Image, ImageOps

log = logging.getLogger(__name__)

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000  # 8000 x 5000: larger than any camera photo people search with
_DRAIN_MAX = 64 * 2**20


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the limit (a decompression bomb, or simply huge)."""


class BadImage(ValueError):
    """Bytes that are not a decodable image of an accepted type."""


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_to: int | None = None) -> Image.Image:
    """Image bytes -> an RGB PIL image with its EXIF orientation applied.

    ``draft_to``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: several times
    less work than a full decode) as long as both sides stay >= ``draft_to`` pixels; callers that
    resize the image down anyway pass twice their target size, so their own antialiased resize still
    does the last step. Raises ImageTooLarge before decoding when width * height > ``max_pixels``, and
    BadImage ("NAME: reason") for empty, unknown, corrupt or truncated data or a type outside :data:`FORMATS`.
    """
    from dinokit.data.images import to_rgb

    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            w, h = im.size  # read from the header: nothing is decoded yet
            if w * h > max_pixels:
                raise ImageTooLarge(f"{name}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
            im.verify()
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:  # verify() leaves the image unusable
            if draft_to is not None and im.format == "JPEG":
                im.draft("RGB", (draft_to, draft_to))
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return im if im.mode == "RGB" else to_rgb(im)
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise BadImage(f"{name}: not an image of an accepted type ({', '.join(FORMATS)})") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise BadImage(f"{name}: corrupt image ({reason})") from e


def parse_box(text: str | None, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """``"[x0, y0, x1, y1]"`` in pixels -> the box clipped to the image ``size`` (W, H); None for no box."""
    if text is None or not str(text).strip():
        return None
    try:
        box = json.loads(text)
        x0, y0, x1, y1 = (float(v) for v in box)
    except (ValueError, TypeError) as e:
        raise ValueError(f"box {text!r}: expected a JSON list [x0, y0, x1, y1] of pixel coordinates") from e
    w, h = size
    x0, x1 = sorted((max(0.0, min(w, x0)), max(0.0, min(w, x1))))
    y0, y1 = sorted((max(0.0, min(h, y0)), max(0.0, min(h, y1))))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"box {text!r}: empty once clipped to the {w}x{h} image")
    return round(x0), round(y0), max(round(x0) + 1, round(x1)), max(round(y0) + 1, round(y1))


def _too_large(limit: int) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps({"error": f"request body over the upload limit of {limit} bytes"}).encode()
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


class BodyLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get 413 ``{"error": ...}``."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reply_413(receive, send, int(declared))
            return
        state = {"seen": 0, "over": False}

        async def counted() -> dict[str, Any]:
            if state["over"]:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                state["seen"] += len(msg.get("body", b""))
                if state["seen"] > self.max_bytes:
                    state["over"] = True
                    await self._reply_413(receive, send, None, more=msg.get("more_body", False))
                    return {"type": "http.disconnect"}  # the app stops reading and its reply is dropped
            return msg

        async def guarded(msg: dict[str, Any]) -> None:
            if not state["over"]:
                await send(msg)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not state["over"]:
                raise
            log.debug("request cut at the upload limit")  # the app saw a disconnect; the 413 is out

    async def _reply_413(self, receive: Any, send: Any, declared: int | None, more: bool = True) -> None:
        # read (and drop) a moderate rest of the body first: a client still sending when the connection
        # closes would see a reset instead of the 413
        drained = 0
        if declared is None or declared <= _DRAIN_MAX:
            while more and drained <= _DRAIN_MAX:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                drained += len(msg.get("body", b""))
                more = msg.get("more_body", False)
        start, body = _too_large(self.max_bytes)
        await send(start)
        await send(body)
