"""Contact sheets: one PNG row per query, the query image then its results with rank and score."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from dinokit._io import atomic_path
from dinokit.data.images import ImageError, load_rgb

if TYPE_CHECKING:
    from dinokit.retrieval.index import Index, SearchResult

log = logging.getLogger(__name__)


def contact_sheet(result: SearchResult, queries: Sequence[Any], out_path: str | os.PathLike[str], *,
                  index: Index | None = None, thumb: int = 128) -> Path:
    """A PNG with one row per query: the query image, then its results with rank and score.

    ``queries``: the query images (paths or PIL images), in the order searched. Result paths are
    opened through ``index.resolve`` (relative to the indexed folder); missing files are drawn grey.
    """
    font = ImageFont.load_default()
    pad, caption = 6, 16
    k = result.paths.shape[1] if result.paths.ndim == 2 else 0
    cell_w, cell_h = thumb + pad, thumb + caption + pad
    sheet = Image.new("RGB", (pad + (k + 1) * cell_w + pad, pad + max(1, len(result)) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)

    def tile(src: Any) -> Image.Image | None:
        try:
            img = src if isinstance(src, Image.Image) else load_rgb(src)
        except ImageError as e:
            log.warning("contact sheet: %s", e)
            return None
        img = img.convert("RGB")
        # fit the longer side to the cell, up or down (small images would otherwise be specks)
        scale = thumb / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        return img.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)

    def put(img: Image.Image | None, col: int, row: int, text: str, color: str) -> None:
        x, y = pad + col * cell_w + (pad if col else 0), pad + row * cell_h
        if img is None:
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(200, 200, 200))
            draw.text((x + 4, y + thumb // 2 - 6), "missing", fill="black", font=font)
        else:
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        draw.text((x, y + thumb + 2), text, fill=color, font=font)

    for i in range(len(result)):
        q = queries[i] if i < len(queries) else None
        name = Path(q).name if isinstance(q, (str, os.PathLike)) else "query"
        put(tile(q) if q is not None else None, 0, i, f"query: {name}"[:24], "blue")
        for j in range(k):
            p = result.paths[i, j]
            if p is None:
                continue
            src = index.resolve(p) if index is not None else Path(p)
            put(tile(src), j + 1, i, f"{j + 1}. {result.scores[i, j]:.3f}", "black")
    out = Path(out_path)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out
