"""Where images come from at scale: one ordered list of items for every kind of input.

:func:`open_source` turns what a user names into a :class:`Source`: N items in a stable order (the
same on every machine and every rerun, so ranks can split the list by index), each with a key (the
``path`` recorded next to its features), a location to read it from, and optional metadata columns.

- a folder: every image under it, recursive, sorted by relative path;
- a text file of paths (``.txt``/``.lst``/``.list``; one per line, ``#`` comments; relative paths
  are relative to the list's folder);
- a table (``.csv``/``.tsv``/``.parquet``) with a ``path`` column; the other columns become metadata;
- WebDataset tar shards: one ``.tar``, a glob (``shards/*.tar``) or a brace pattern
  (``shards/{000..099}.tar``); each sample (members sharing a key) gives its first member with an
  image extension; ``.txt``/``.cls`` members become the ``txt``/``cls`` metadata columns.

Decoding goes through :func:`dinokit.data.images.decode_rgb`, so unreadable images become
:class:`~dinokit.data.images.Skipped` items exactly as for folders. Inputs that cannot be listed
(a missing file named in a list is found at decode time; a damaged tar is found here) are recorded
in ``Source.skipped``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from dinokit.data.images import ImageError, Skipped, decode_rgb, is_image_file, load_rgb, scan_images
from dinokit.data.transforms import resize_arg

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst", ".list")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
_TAR_META = ("txt", "cls")  # small text members of a WebDataset sample kept as metadata
_BRACE = re.compile(r"\{([^{}]*)\}")


class TarMember(NamedTuple):
    """Where one image lives inside an uncompressed tar: its data offset and size in bytes."""

    tar: str
    offset: int
    size: int


Location = str | TarMember


@dataclass
class Source:
    """An ordered list of N images: ``keys`` (N names for the outputs), ``locations`` (N places to read),
    ``metadata`` (column -> N values, maybe empty), ``skipped`` ((input, reason) dropped at listing)."""

    kind: str
    spec: str
    keys: list[str]
    locations: list[Location]
    metadata: dict[str, list[Any]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def digest(self) -> str:
        """sha256 of the ordered keys: two listings with the same digest split into the same shards."""
        h = hashlib.sha256()
        for k in self.keys:
            h.update(k.encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the inputs."""
        return {"kind": self.kind, "spec": self.spec, "count": len(self), "sha256": self.digest(),
                "metadata_columns": sorted(self.metadata), "skipped_at_listing": len(self.skipped)}


def read_image(location: Location, key: str) -> Image.Image:
    """Decode the image at ``location`` to RGB; :class:`ImageError` naming ``key`` when it cannot be used."""
    if isinstance(location, str):
        return load_rgb(location)
    return decode_rgb(io.BytesIO(read_bytes(location, key)), key)


class SourceDataset(torch.utils.data.Dataset):
    """Items of a :class:`Source` -> ``(transform(image), index)``, or :class:`Skipped` when unusable."""

    def __init__(self, source: Source, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.keys, self.locations, self.transform = source.keys, source.locations, transform

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Skipped:
        key = self.keys[index]
        try:
            return self.transform(read_image(self.locations[index], key)), index
        except ImageError as e:
            return Skipped(index, key, e.reason)
        except Exception as e:  # a transform failing on a decodable image: skip, never crash the run
            return Skipped(index, key, f"preprocessing failed ({type(e).__name__}: {e})")


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory images -> ``(tensor, index)``: uint8 (N, H, W[, C]) through ``transform`` (via PIL),
    or ready float model input (N, 3, H, W) as-is when ``transform`` is None."""

    def __init__(self, array: np.ndarray | torch.Tensor,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        self.array, self.transform = array, transform

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        a = self.array[index]
        if self.transform is None:
            return torch.as_tensor(a), index
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        return self.transform(Image.fromarray(np.asarray(a))), index


# ------------------------------------------------------------------------------------ listing


def open_source(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                follow_links: bool = False) -> Source:
    """List the images ``spec`` names (see the module docstring); a sequence is a list of image paths.

    Raises FileNotFoundError / ValueError (one line naming the input) when nothing can be listed.
    """
    if not isinstance(spec, (str, os.PathLike)):
        paths = [str(p) for p in spec]
        return Source("paths", f"{len(paths)} paths", paths, list(paths))
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        return _folder(path, follow_links)
    if _is_tar_pattern(text):
        return _tars(text)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in LIST_SUFFIXES:
        return _path_list(path)
    if suffix in TABLE_SUFFIXES:
        return _table(path)
    if is_image_file(path):
        return Source("file", text, [text], [text])
    raise ValueError(f"{path}: unknown input type; use a folder, an image, a path list ({', '.join(LIST_SUFFIXES)}), "
                     f"a table ({', '.join(TABLE_SUFFIXES)}) or WebDataset .tar shards")


def _folder(root: Path, follow_links: bool = False) -> Source:
    """Every image under ``root``; the files the walk skipped go into ``Source.skipped`` (reported
    once, by whoever reports the result), with names relative to ``root`` like the keys."""
    paths, skipped = scan_images(root, follow_links=follow_links)
    if not paths:
        raise ValueError(f"{root}: no image files found (extensions: jpg, png, webp, ...)")
    keys = [p.relative_to(root).as_posix() for p in paths]
    return Source("folder", str(root), keys, [str(p) for p in paths],
                  skipped=[(_relative(path, root), reason) for path, reason in skipped])


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def _resolve(base: Path, entry: str) -> str:
    p = Path(entry).expanduser()
    return str(p if p.is_absolute() else base / p)


def _path_list(path: Path) -> Source:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the path list ({e})") from e
    keys = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    if not keys:
        raise ValueError(f"{path}: the path list names no files")
    return Source("list", str(path), keys, [_resolve(path.parent, k) for k in keys])


def _table(path: Path) -> Source:
    # pyarrow (a dependency) parses CSV and parquet with type inference; imported here because it is
    # heavy and only table inputs need it.
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            delim = "\t" if path.suffix.lower() == ".tsv" else ","
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delim))
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot read the table ({str(e).splitlines()[0]})") from e
    if "path" not in table.column_names:
        raise ValueError(f"{path}: no 'path' column (columns: {', '.join(table.column_names) or 'none'})")
    keys = [str(k) for k in table.column("path").to_pylist()]
    if not keys:
        raise ValueError(f"{path}: the table has no rows")
    meta = {name: table.column(name).to_pylist() for name in table.column_names if name != "path"}
    return Source("table", str(path), keys, [_resolve(path.parent, k) for k in keys], meta)


# ------------------------------------------------------------------------------------ tars


def _is_tar_pattern(text: str) -> bool:
    return text.lower().endswith(".tar") and (glob.has_magic(text) or "{" in text or Path(text).is_file())


def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b{x,y}`` -> a0bx a0by a1bx ...; numeric ranges keep the zero padding of their bounds."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def tar_paths(pattern: str) -> list[str]:
    """The tar files a pattern names, in a stable order: brace expansion order, each glob sorted."""
    out: list[str] = []
    for p in expand_braces(pattern):
        if glob.has_magic(p):
            out.extend(sorted(glob.glob(p)))
        else:
            out.append(p)
    if not out:
        raise FileNotFoundError(f"{pattern}: no tar files match")
    return out


def _tars(pattern: str) -> Source:
    src = Source("webdataset", pattern, [], [])
    columns: dict[str, list[Any]] = {c: [] for c in _TAR_META}
    for tar in tar_paths(pattern):
        if not Path(tar).is_file():
            src.skipped.append((tar, "no such tar file"))
            continue
        _list_tar(tar, src, columns)
    if not src.keys:
        reason = f" ({src.skipped[0][0]}: {src.skipped[0][1]})" if src.skipped else ""
        raise ValueError(f"{pattern}: no images in the tar files{reason}")
    src.metadata = {c: v for c, v in columns.items() if any(x is not None for x in v)}
    return src


def _sample_key(name: str) -> str:
    """WebDataset's sample key: the member path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def _list_tar(tar: str, src: Source, columns: dict[str, list[Any]]) -> None:
    """Append the images of one tar (one per sample, in tar order) to ``src``; a damaged tar keeps the
    samples read before the damage and is reported in ``src.skipped``."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(tar, "r:") as tf:  # plain tar only: members must be addressable by offset
            for m in tf:
                if not m.isfile():
                    continue
                key = _sample_key(m.name)
                sample = samples.setdefault(key, {})
                ext = m.name.rpartition(".")[2].lower()
                if "image" not in sample and is_image_file(m.name):
                    sample["image"] = (m.name, TarMember(tar, m.offset_data, m.size))
                elif ext in _TAR_META and m.size <= 1 << 16:
                    data = tf.extractfile(m)
                    sample[ext] = data.read().decode("utf-8", "replace").strip() if data else None
    except (OSError, tarfile.TarError, EOFError) as e:
        src.skipped.append((tar, f"damaged tar after {len(samples)} samples ({type(e).__name__}: {e})"))
    for sample in samples.values():
        if "image" not in sample:
            continue
        name, member = sample["image"]
        src.keys.append(f"{tar}/{name}")
        src.locations.append(member)
        for c in _TAR_META:
            columns[c].append(sample.get(c))


# ------------------------------------------------------------------------------------ device decode


class RawBatch(NamedTuple):
    """Encoded files of a batch (1-D uint8 tensors), their item indices, and the items not readable."""

    data: list[torch.Tensor]
    indices: list[int]
    keys: list[str]
    skipped: list[Skipped]


def read_bytes(location: Location, key: str) -> bytes:
    """The encoded bytes of one item; :class:`ImageError` naming ``key`` when unreadable."""
    if isinstance(location, str):
        try:
            with open(location, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(key, f"cannot read file ({e.strerror or e})") from e
    else:
        try:
            with open(location.tar, "rb") as f:
                # pread-style access: no shared file offset, so worker processes never interfere.
                data = os.pread(f.fileno(), location.size, location.offset)
        except OSError as e:
            raise ImageError(key, f"cannot read tar ({e.strerror or e})") from e
        if len(data) < location.size:
            raise ImageError(key, f"truncated tar member ({len(data)} of {location.size} bytes)")
    if not data:
        raise ImageError(key, "empty file")
    return data


class RawSourceDataset(torch.utils.data.Dataset):
    """Items of a :class:`Source` -> ``(encoded bytes as a uint8 tensor, index)``: workers only read files,
    the embedding device decodes (``EmbedOptions.decode="device"``)."""

    def __init__(self, source: Source) -> None:
        self.keys, self.locations = source.keys, source.locations

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Skipped:
        key = self.keys[index]
        try:
            data = read_bytes(self.locations[index], key)
        except ImageError as e:
            return Skipped(index, key, e.reason)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), index


def collate_raw(items: Sequence[Any]) -> RawBatch:
    good = [it for it in items if not isinstance(it, Skipped)]
    return RawBatch([d for d, _ in good], [i for _, i in good], [], [it for it in items if isinstance(it, Skipped)])


class DeviceDecoder:
    """Decode and preprocess a :class:`RawBatch` on ``device``: JPEGs in one batched
    ``torchvision.io.decode_jpeg`` call (nvJPEG on CUDA), other formats with ``decode_image`` on the CPU
    and, when torchvision cannot read a file, Pillow (which also names the reason for a bad one). Then
    resize (antialiased) + center crop + normalize as ``eval_transform`` does, on tensors.
    Returns ``(x (B, 3, S, S) float32 on device, kept indices, skipped)``.
    """

    def __init__(self, pre: dict[str, Any], device: torch.device, keys: list[str]) -> None:
        self.pre, self.device, self.keys = pre, device, keys
        self.mean = torch.tensor(pre["mean"], device=device).view(3, 1, 1)
        self.std = torch.tensor(pre["std"], device=device).view(3, 1, 1)

    def __call__(self, raw: RawBatch) -> tuple[torch.Tensor | None, list[int], list[Skipped]]:
        decoded = self._decode(raw)
        kept = [i for i, img in zip(raw.indices, decoded, strict=True) if isinstance(img, torch.Tensor)]
        bad = list(raw.skipped) + [Skipped(i, self.keys[i], img) for i, img in zip(raw.indices, decoded, strict=True)
                                   if isinstance(img, str)]
        imgs = [self._preprocess(img) for img in decoded if isinstance(img, torch.Tensor)]
        return (torch.stack(imgs) if imgs else None), kept, bad

    def _decode(self, raw: RawBatch) -> list[torch.Tensor | str]:
        # torchvision is imported here: only the device-decode path needs its io module.
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | str] = [""] * len(raw.data)
        jpeg = [k for k, d in enumerate(raw.data) if len(d) > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8]
        if jpeg and self.device.type == "cuda":
            try:
                imgs = decode_jpeg([raw.data[k] for k in jpeg], mode=ImageReadMode.RGB, device=self.device,
                                   apply_exif_orientation=True)
                for k, img in zip(jpeg, imgs, strict=True):
                    out[k] = img
            except RuntimeError as e:  # one bad file fails the batch call: decode one by one below
                log.debug("batched GPU decode failed (%s); decoding one by one", e)
        for k, d in enumerate(raw.data):
            if not isinstance(out[k], torch.Tensor):
                out[k] = self._decode_one(d, self.keys[raw.indices[k]])
        return out

    def _decode_one(self, data: torch.Tensor, key: str) -> torch.Tensor | str:
        from torchvision.io import ImageReadMode, decode_image

        try:
            img = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            if img.dtype != torch.uint8:  # 16-bit PNGs: Pillow's path scales them as load_rgb does
                raise ValueError(f"{img.dtype} image")
            return img.to(self.device)
        except (RuntimeError, ValueError):
            try:  # formats and modes torchvision does not read (CMYK TIFF, 16-bit, palettes): Pillow
                img = decode_rgb(io.BytesIO(data.numpy().tobytes()), key)
            except ImageError as e:
                return e.reason
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(self.device)

    def _preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> normalized float (3, S, S), as eval_transform does with PIL."""
        import torchvision.transforms.v2.functional as F

        p = self.pre
        img = F.resize(img, resize_arg(p), interpolation=F.InterpolationMode(p["interpolation"]), antialias=True)
        img = F.center_crop(img, [p["crop_size"], p["crop_size"]])
        return (img.float() / 255.0 - self.mean) / self.std
