"""Batched feature extraction: any image source -> an :class:`Embeddings` table or a sharded folder.

:func:`embed` returns features in memory; :func:`embed_to_folder` writes resumable shards, split
across the processes of a ``torchrun`` job; :func:`load_embeddings` / :func:`iter_embeddings` read
every form back. For a GPU, decoding and resizing run in DataLoader worker processes while the
model runs in the main process, so the two overlap; on the CPU, where the model's threads use every
core, background-priority threads decode the next batch into uint8 pixels (see
:func:`_decode_ahead`). Unreadable images are skipped and reported (``strict=True`` makes them an
error). Inference runs under ``torch.inference_mode``, in the precision of
:func:`embed_precision` (bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere), or with
onnxruntime on the CPU (``runtime="onnx"``: the model exported once to a cached ONNX file).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from dinokit import distributed
from dinokit._io import atomic_path, write_json
from dinokit._types import Progress
from dinokit._validate import one_line
from dinokit.data.images import ImageError, Skipped, collate_skipping
from dinokit.data.sources import (
    ArrayDataset,
    DeviceDecoder,
    RawSourceDataset,
    Source,
    SourceDataset,
    collate_raw,
    open_source,
)
from dinokit.data.transforms import eval_transform, normalize_pixels, pixel_transform, preprocessing_config
from dinokit.devices import cpu_has_native_bf16, model_device, resolve_device, usable_cores

# compute_features lives with the models; re-exported here for existing imports
from dinokit.models.features import FEATURE_KINDS as FEATURE_KINDS
from dinokit.models.features import check_features as check_features
from dinokit.models.features import compute_features as compute_features
from dinokit.models.features import feature_dim as feature_dim
from dinokit.shards import (
    FORMAT_VERSION,
    FORMATS,
    MANIFEST,
    complete_record,
    job_mismatch,
    my_shards,
    n_shards_of,
    plan_shards,
    read_manifest,
    read_parquet,
    read_shard,
    remove_stale_temp_files,
    shard_stem,
    write_parquet,
    write_shard,
)

log = logging.getLogger(__name__)
# the runtime and precision chosen, on their own logger: the CLI shows it (announced automatic choices)
choice_log = logging.getLogger(f"{__name__}.choice")

ImagesLike = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | np.ndarray | torch.Tensor


# ------------------------------------------------------------------------------------ options


PRECISIONS = ("auto", "fp32", "bf16")
RUNTIMES = ("torch", "onnx")


@dataclass(frozen=True)
class EmbedOptions:
    """How to embed, passed as one value by every caller (CLI, evaluation, index building).

    batch_size: images per forward pass; device: None = the model's device, else CUDA if available
    (``cuda:<LOCAL_RANK>`` under torchrun); num_workers: decoding processes (None = on the CPU
    low-priority threads decoding one batch ahead, else cores - 1 processes, at most 8); image_size: crop size (None = the model's); features: see :func:`compute_features`;
    strict: stop at the first unreadable image instead of skipping it; decode: "cpu" (Pillow in the
    DataLoader workers) or "device" (workers only read files; the embedding device decodes them,
    JPEGs with nvJPEG on CUDA: for GPUs that CPU decoding cannot keep busy); follow_links: walk into
    links that lead outside a folder given as input (a link loop is visited once either way);
    precision: "auto" (see :func:`embed_precision`), "fp32" or "bf16" (autocast); runtime: "torch", or
    "onnx" (CPU only, fp32: onnxruntime runs the model exported by :mod:`dinokit.onnx`, cached per
    model, image size and feature kind; faster than torch fp32 on some CPUs, see benchmarks/RESULTS.md).
    """

    batch_size: int = 64
    device: str | torch.device | None = None
    num_workers: int | None = None
    image_size: int | None = None
    features: str = "cls"
    strict: bool = False
    decode: str = "cpu"
    follow_links: bool = False
    precision: str = "auto"
    runtime: str = "torch"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime={self.runtime!r}: expected one of {', '.join(RUNTIMES)}")
        if self.runtime == "onnx" and self.precision == "bf16":
            raise ValueError("runtime='onnx' runs the fp32 export; precision='bf16' needs runtime='torch'")
        if self.decode not in ("cpu", "device"):
            raise ValueError(f"decode={self.decode!r}: expected 'cpu' (Pillow in workers) or 'device'")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        check_features(self.features)

    def with_overrides(self, **overrides: Any) -> EmbedOptions:
        """A copy with some fields replaced; an unknown name is a one-line ValueError."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            names = ", ".join(f.name for f in fields(self))
            raise ValueError(f"unknown embedding option(s) {', '.join(unknown)}; options are {names}")
        return replace(self, **overrides) if overrides else self


def _options(options: EmbedOptions | None, overrides: dict[str, Any]) -> EmbedOptions:
    return (options or EmbedOptions()).with_overrides(**overrides)


# ------------------------------------------------------------------------------------ results


@dataclass
class Embeddings:
    """Features of a set of images.

    features: float32 CPU tensor (N, D) (or (N, P, D) for patch tokens); paths: N names, relative to
    the folder when a folder was embedded, "0", "1", ... for arrays; skipped: (path, reason) of the
    files that could not be read; info: model identity and settings; metadata: column name -> N values
    (the extra columns of a CSV/parquet input, or a WebDataset sample's txt/cls).
    """

    features: torch.Tensor
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        shape = " x ".join(str(s) for s in self.features.shape)
        parts = [f"{shape} {str(self.features.dtype).replace('torch.', '')}"]
        parts += [f"{k}={self.info[k]}" for k in ("features", "model") if self.info.get(k)]
        if self.metadata:
            parts.append(f"metadata=[{', '.join(self.metadata)}]")
        if self.skipped:
            parts.append(f"skipped={len(self.skipped)}")
        return f"Embeddings({', '.join(parts)})"

    def numpy(self) -> np.ndarray:
        return self.features.numpy()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``.npz`` (arrays features, paths, info, metadata), ``.npy`` (features only),
        ``.safetensors`` (tensor features; paths, info and metadata as JSON in its header) or
        ``.parquet`` (columns path, metadata..., features), atomically. Returns the path."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in FILE_SUFFIXES:
            raise ValueError(f"{path}: unknown feature file type; use {', '.join(FILE_SUFFIXES)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        feats = self.features.detach().to("cpu", torch.float32).contiguous()
        if suffix == ".parquet":
            write_parquet(path, feats.numpy(), self.paths, self.metadata, self.info)
            return path
        info = json.dumps(self.info, default=str)
        meta = json.dumps(self.metadata, default=str)
        with atomic_path(path) as tmp:
            if suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file({"features": feats}, str(tmp), metadata={
                    "paths": json.dumps(self.paths), "info": info, "metadata": meta, "format": "pt"})
            else:
                with open(tmp, "wb") as f:
                    if suffix == ".npy":
                        np.save(f, feats.numpy())
                    else:
                        np.savez(f, features=feats.numpy(), paths=np.asarray(self.paths, dtype=str),
                                 info=np.asarray(info), metadata=np.asarray(meta))
        return path


FILE_SUFFIXES = (".npz", ".npy", ".safetensors", ".parquet")


def _read_file(path: Path) -> Embeddings:
    """One feature file (any of :data:`FILE_SUFFIXES`) -> Embeddings."""
    suffix = path.suffix.lower()
    info: dict[str, Any] = {}
    meta: dict[str, list[Any]] = {}
    if suffix == ".parquet":
        arr, paths, meta, info = read_parquet(path)
        return Embeddings(torch.from_numpy(arr), paths, [], info, meta)
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            feats = f.get_tensor("features")
        paths = json.loads(header["paths"]) if "paths" in header else [str(i) for i in range(len(feats))]
        info = json.loads(header.get("info", "{}"))
        meta = json.loads(header.get("metadata", "{}"))
    elif suffix == ".npy":
        feats = torch.from_numpy(np.load(path, allow_pickle=False))
        paths = [str(i) for i in range(len(feats))]
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            feats = torch.from_numpy(z["features"])
            paths = [str(p) for p in z["paths"]] if "paths" in z else [str(i) for i in range(len(feats))]
            info = json.loads(str(z["info"])) if "info" in z else {}
            meta = json.loads(str(z["metadata"])) if "metadata" in z else {}
    else:
        raise ValueError(f"{path}: unknown feature file type; use {', '.join(FILE_SUFFIXES)} or a feature folder")
    return Embeddings(feats, paths, [], info, meta)


def iter_embeddings(path: str | os.PathLike[str], *, verify: bool = False) -> Iterator[Embeddings]:
    """Stream a feature folder shard by shard (one :class:`Embeddings` each, in item order), or yield a
    single feature file whole. ``verify=True`` checks each shard's sha256 before reading it. Each
    shard's ``info`` adds ``shard`` (its index), ``items`` (its input range) and ``row_offset`` (the
    global row number of its first row, as in :func:`load_embeddings`).

    Memory stays at one shard, so sets larger than memory can be indexed or scanned.
    """
    path = Path(path)
    if not path.is_dir():
        yield load_embeddings(path)
        return
    manifest = read_manifest(path)
    if manifest.get("status") != "complete":
        done = sum(1 for _ in path.glob("shard-*.json"))
        raise ValueError(f"{path}: unfinished embedding job ({done} of {n_shards_of(manifest)} shards); "
                         "rerun the same command with --resume")
    info = _info_of(manifest)
    row = 0
    for rec in manifest["shards"]:
        if verify and complete_record(path, rec["index"], n_shards_of(manifest), tuple(rec["items"])) is None:
            raise ValueError(f"{path / rec['files']['features']}: checksum mismatch or missing shard file")
        try:
            arr, paths, meta = read_shard(path, rec, manifest["feature_shape"])
        except (OSError, KeyError) as e:
            raise ValueError(f"{path}: shard {rec.get('index')} unreadable ({type(e).__name__}: {e})") from e
        skipped = [(s["path"], s["reason"]) for s in rec.get("skipped", [])]
        # where the shard sits: global row numbers row_offset.. are stable ids for an index built from it
        where = {"shard": rec["index"], "items": rec["items"], "row_offset": row}
        row += len(paths)
        yield Embeddings(torch.from_numpy(arr), paths, skipped, {**info, **where}, meta)


def _info_of(manifest: dict[str, Any]) -> dict[str, Any]:
    pre = manifest.get("preprocessing") or {}
    return {**manifest.get("model", {}), "features": manifest.get("features"), "image_size": pre.get("crop_size")}


def load_embeddings(path: str | os.PathLike[str]) -> Embeddings:
    """Read features written by dinokit: a ``.npz``/``.npy``/``.safetensors``/``.parquet`` file (``.npy``
    files get paths "0", "1", ...) or a sharded feature folder (all shards, in item order)."""
    path = Path(path)
    if path.is_dir():
        parts = list(iter_embeddings(path))
        manifest = read_manifest(path)
        shape = manifest["feature_shape"]
        feats = torch.cat([p.features for p in parts]) if parts else torch.empty((0, *shape))
        meta = {k: [v for p in parts for v in p.metadata.get(k, [None] * len(p))]
                for k in (parts[0].metadata if parts else {})}
        skipped = [(s["path"], s["reason"]) for s in manifest.get("skipped", [])]
        return Embeddings(feats, [x for p in parts for x in p.paths], skipped, _info_of(manifest), meta)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        emb = _read_file(path)
    except Exception as e:  # BadZipFile, EOFError, SafetensorError, numpy's ValueErrors: one line naming the file
        if isinstance(e, ValueError) and str(e).startswith(f"{path}:"):
            raise
        raise ValueError(f"{path}: not a dinokit feature file ({type(e).__name__}: {one_line(str(e))})") from e
    if len(emb.paths) != len(emb.features):
        raise ValueError(f"{path}: {len(emb.features)} feature rows but {len(emb.paths)} paths")
    emb.features = emb.features.float()
    return emb


# ------------------------------------------------------------------------------------ inputs


def _dataset(images: ImagesLike, transform: Callable[[Image.Image], torch.Tensor], follow_links: bool = False
             ) -> tuple[torch.utils.data.Dataset, Source, bool]:
    """(dataset, source, decodes_files) for any accepted ``images`` value; arrays get a Source of
    names "0", "1", ... and no locations."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            images = images.cpu().numpy()
        elif images.is_floating_point():
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"float image tensor must be (N, 3, H, W) model input, got {tuple(images.shape)}")
            return ArrayDataset(images), _array_source(len(images)), False
        else:
            raise ValueError(f"image tensor dtype {images.dtype}: expected uint8 images or float model input")
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"image array dtype {images.dtype}: expected uint8 (N, H, W) or (N, H, W, 3)")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
            raise ValueError(f"image array shape {images.shape}: expected (N, H, W) or (N, H, W, 3)")
        return ArrayDataset(images, transform), _array_source(len(images)), False
    source = open_source(images, follow_links=follow_links)
    return SourceDataset(source, transform), source, True


def _array_source(n: int) -> Source:
    names = [str(i) for i in range(n)]
    return Source("array", f"{n} images in memory", names, [])


def default_num_workers() -> int:
    """Decoding workers per process: all cores but the one each process feeds its model from, shared by
    the processes of this machine (torchrun), at most 8."""
    return max(1, min(8, usable_cores() // distributed.local_world_size() - 1))


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The requested device, else the model's (when not the CPU), else CUDA if available (per rank)."""
    if device is not None:
        return resolve_device(device, distributed.local_rank())
    here = model_device(model)
    return here if here.type != "cpu" else resolve_device(None, distributed.local_rank())


def _as_model(model: nn.Module | str | os.PathLike[str]) -> nn.Module:
    if isinstance(model, (str, os.PathLike)):
        from dinokit.hub import load  # hub imports the Hub client; only needed for a model by name

        return load(str(model))
    return model


def _inputs(dataset: torch.utils.data.Dataset, source: Source, opts: EmbedOptions, dev: torch.device,
            pre: dict[str, Any], batches: list[list[int]]
            ) -> Iterator[tuple[torch.Tensor | None, list[int], list[Skipped]]]:
    """Model input batches in the order of ``batches``: (x on ``dev`` or None, kept indices, skipped).

    Ready model input in memory is sliced; files are decoded by DataLoader workers with Pillow, or,
    with ``opts.decode == "device"``, only read by the workers and decoded on ``dev``
    (:class:`~dinokit.data.sources.DeviceDecoder`: nvJPEG on CUDA).
    """
    if isinstance(dataset, ArrayDataset) and dataset.transform is None:
        # Ready model input already in memory: slice it, no workers, no per-item copies.
        for b in batches:
            yield torch.as_tensor(dataset.array[b[0]:b[-1] + 1]).to(dev), b, []
        return
    raw = opts.decode == "device" and isinstance(dataset, SourceDataset)
    if dev.type == "cpu" and opts.num_workers is None and not raw:
        yield from _decode_ahead(_pixels_of(dataset, source, pre), pre, batches)
        return
    workers = default_num_workers() if opts.num_workers is None else int(opts.num_workers)
    workers = min(workers, len(batches))
    loader = torch.utils.data.DataLoader(
        RawSourceDataset(source) if raw else dataset, batch_sampler=batches, num_workers=workers,
        collate_fn=collate_raw if raw else collate_skipping, pin_memory=dev.type == "cuda" and not raw,
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
    )
    decoder = DeviceDecoder(pre, dev, source.keys) if raw else None
    for batch in loader:
        if decoder is not None:
            yield decoder(batch)
        else:
            x = batch.images.to(dev, non_blocking=True) if batch.images is not None else None
            yield x, batch.indices.tolist(), list(batch.skipped)


def _pixels_of(dataset: torch.utils.data.Dataset, source: Source, pre: dict[str, Any]
               ) -> torch.utils.data.Dataset:
    """The same items as uint8 pixels (3, S, S) instead of normalized floats (see _decode_ahead)."""
    pixels = pixel_transform(pre)
    if isinstance(dataset, ArrayDataset):
        return ArrayDataset(dataset.array, pixels)
    return SourceDataset(source, pixels)


def _decode_ahead(dataset: torch.utils.data.Dataset, pre: dict[str, Any], batches: list[list[int]]
                  ) -> Iterator[tuple[torch.Tensor | None, list[int], list[Skipped]]]:
    """CPU embedding: decode the next batch on background-priority threads while the model runs.

    The model's intra-op threads use every core; a decoding process beside them preempts one of them
    and the others wait for it at every barrier, so it costs the model more than its own CPU time
    (2 cores, ViT-S/16 bf16: a worker process gave 0.79 of the bare model's speed, decoding between
    two forwards 0.85). Threads at nice 19 (Linux: per thread) take the cores only when the model
    leaves them idle, and Pillow releases the GIL while it decodes and resizes; elsewhere the batch is
    decoded between two forwards. ``dataset`` yields uint8 pixels, normalized once per batch
    (:func:`normalize_pixels`). ``num_workers=`` given: worker processes instead.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    get = cast(Callable[[int], Any], dataset.__getitem__)
    ahead = sys.platform.startswith("linux")
    with ThreadPoolExecutor(max_workers=max(1, usable_cores()), thread_name_prefix="dinokit-decode",
                            initializer=_background_priority if ahead else None) as pool:
        pending: list[Future[Any]] | None = None
        for j, b in enumerate(batches):
            items = [f.result() for f in (pending or [pool.submit(get, i) for i in b])]
            nxt = batches[j + 1] if ahead and j + 1 < len(batches) else None
            pending = [pool.submit(get, i) for i in nxt] if nxt else None
            batch = collate_skipping(items)
            x = None if batch.images is None else normalize_pixels(batch.images, pre["mean"], pre["std"])
            yield x, batch.indices.tolist(), list(batch.skipped)


def _background_priority() -> None:
    """Lower the calling thread to nice 19 (on Linux a thread's own priority; never fails the run)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _batches_of(start: int, stop: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(s + batch_size, stop))) for s in range(start, stop, batch_size)]


def embed_precision(dev: torch.device, precision: str = "auto") -> str:
    """The precision embedding runs in: "fp32" or "bf16" (autocast).

    "auto": bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX; ViT-S/16 inference ran
    2.2x fp32 there, features at cosine >= 0.9999), fp32 on every other device: an AVX2-only CPU
    would emulate bf16 many times slower than fp32. ``$DINOKIT_EMBED_PRECISION`` (fp32 or bf16)
    replaces the automatic choice, e.g. for the same features bit for bit on every machine.
    """
    if precision == "auto" and (pinned := os.environ.get("DINOKIT_EMBED_PRECISION")):
        if pinned not in ("fp32", "bf16"):
            raise ValueError(f"$DINOKIT_EMBED_PRECISION={pinned!r}: expected fp32 or bf16")
        precision = pinned
    if precision != "auto":
        if precision == "bf16" and dev.type == "cpu" and not cpu_has_native_bf16():
            _warn_once("precision bf16 on a CPU without native bf16: emulated, much slower than fp32")
        return precision
    if dev.type == "cuda" or (dev.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


@functools.cache
def _warn_once(message: str) -> None:
    """A warning said once per process (a sharded job asks for the precision more than once)."""
    log.warning(message)


FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def _feature_fn(model: nn.Module, dev: torch.device, opts: EmbedOptions, image_size: int) -> FeatureFn:
    """x (B, 3, S, S) on ``dev`` -> float32 CPU features, with the chosen runtime and precision
    (announced once on this module's logger)."""
    if opts.runtime == "onnx":
        from dinokit.onnx import OnnxFeatures

        if dev.type != "cpu":
            raise ValueError(f"runtime='onnx' runs on the CPU; use device='cpu' or runtime='torch' on {dev}")
        session = OnnxFeatures.for_model(model, opts.features, image_size)
        choice_log.info("embedding with onnxruntime (fp32, %d threads): %s", session.threads, session.path)
        return session
    precision = embed_precision(dev, opts.precision)
    choice_log.info("embedding on %s in %s%s", dev, precision, _why(dev, opts.precision, precision))
    use_bf16 = precision == "bf16"

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            return compute_features(model, x, opts.features).float().cpu()

    return run


def _why(dev: torch.device, asked: str, chosen: str) -> str:
    """How an automatic precision was chosen, for the announcement ("" when it was asked for)."""
    if asked != "auto":
        return ""
    if os.environ.get("DINOKIT_EMBED_PRECISION"):
        return " ($DINOKIT_EMBED_PRECISION)"
    if dev.type != "cpu":
        return " (auto)"
    return " (auto: native bf16 on this CPU)" if chosen == "bf16" else " (auto: no native bf16 on this CPU)"


def _forward(features_of: FeatureFn, inputs: Iterable[tuple[torch.Tensor | None, list[int], list[Skipped]]],
             opts: EmbedOptions) -> Iterator[tuple[torch.Tensor | None, list[int], list[Skipped]]]:
    """Run the model over input batches: (features (b, ...) float32 CPU or None, kept indices, skipped)."""
    for x, idx, bad in inputs:
        if opts.strict and bad:
            raise ImageError(bad[0].path, bad[0].reason)
        yield (features_of(x) if x is not None else None), idx, bad


# ------------------------------------------------------------------------------------ embed


def embed(
    model: nn.Module | str,
    images: ImagesLike,
    options: EmbedOptions | None = None,
    *,
    progress: Progress | None = None,
    **overrides: Any,
) -> Embeddings:
    """Embed images with ``model`` (moved to the device) and return features in input order.

    ``images``: anything :func:`dinokit.data.sources.open_source` reads (a folder, recursive and
    sorted; a path-list, CSV or parquet file; WebDataset tars; one image), a list of image paths,
    uint8 images (N, H, W) or (N, H, W, 3) as numpy array or tensor (these get the model's eval
    preprocessing), or a float tensor (N, 3, H, W) taken as ready model input. Settings come from
    ``options`` and keyword overrides of its fields (``embed(m, x, batch_size=32)``). A model in
    training mode is put back in training mode afterwards. Unreadable files are skipped and listed in
    ``Embeddings.skipped``; ``strict=True`` raises :class:`~dinokit.data.images.ImageError` on the
    first one. ``progress(done, total)`` is called after each batch.
    """
    opts = _options(options, overrides)
    model = _as_model(model)
    dev = _device(model, opts.device)
    dataset, source, decodes = _dataset(images, eval_transform(model, opts.image_size), opts.follow_links)
    total = len(source)
    pre = preprocessing_config(model, opts.image_size)
    inputs = _inputs(dataset, source, opts, dev, pre, _batches_of(0, total, opts.batch_size))
    chunks: list[torch.Tensor] = []
    kept: list[int] = []
    skipped: list[Skipped] = []
    done = 0
    was_training = model.training
    model = model.to(dev).eval()
    features_of = _feature_fn(model, dev, opts, pre["crop_size"])
    with torch.inference_mode(), _restore_mode(model, was_training):
        for y, idx, bad in _forward(features_of, inputs, opts):
            if y is not None:
                chunks.append(y)
                kept.extend(idx)
            skipped.extend(bad)
            done += len(idx) + len(bad)
            if progress is not None:
                progress(done, total)
        feats = torch.cat(chunks) if chunks else torch.empty((0, feature_dim(model, opts.features)))
    _log_skipped(skipped, "")
    info = {**_identity(model), "features": opts.features,
            "image_size": preprocessing_config(model, opts.image_size)["crop_size"]
            if decodes or (isinstance(dataset, ArrayDataset) and dataset.transform is not None) else None}
    meta = {k: [v[i] for i in kept] for k, v in source.metadata.items()}
    bad_files = source.skipped + [(source.keys[s.index], s.reason) for s in skipped]
    return Embeddings(feats, [source.keys[i] for i in kept], bad_files, info, meta)


def _log_skipped(skipped: Sequence[Skipped], where: str) -> None:
    if skipped:
        # INFO: the skipped files are part of the result (Embeddings.skipped, the manifest), which the
        # caller reports; a warning here made the CLI name them twice
        log.info("%sskipped %d unreadable files (first: %s: %s)", where, len(skipped),
                    skipped[0].path, skipped[0].reason)
    for s in skipped:
        log.debug("skipped %s: %s", s.path, s.reason)


@contextlib.contextmanager
def _restore_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put a model that was training back into training mode afterwards (embed runs it in eval)."""
    try:
        yield
    finally:
        model.train(training)


def _identity(model: nn.Module) -> dict[str, Any]:
    try:
        from dinokit.models.backbone import identity

        ident = identity(model)
        return {"model": ident["name"], "arch": ident["arch"], "fingerprint": ident["fingerprint"]}
    except Exception as e:  # a model without pretrained_cfg: features are still valid
        log.debug("no model identity: %s", e)
        return {"model": type(model).__name__}


# ------------------------------------------------------------------------------------ sharded


def embed_to_folder(
    model: nn.Module | str,
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    options: EmbedOptions | None = None,
    *,
    shard_size: int = 10_000,
    format: str = "parquet",
    resume: bool = False,
    progress: Progress | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Embed ``images`` into a sharded feature folder ``out`` (layout: :mod:`dinokit.shards`); returns
    the manifest. The same call in every process of a ``torchrun`` job splits the work.

    Every rank lists the inputs in the same stable order; shard ``i`` holds items
    ``[i * shard_size, (i + 1) * shard_size)`` and is written by rank ``i % world_size``, batch by batch
    exactly as one process would, so features do not depend on the number of processes.
    ``resume=True`` keeps the shards whose checksums verify and redoes the others; without it an
    existing job in ``out`` is an error. Rank 0 writes ``manifest.json`` at the start ("running") and
    at the end ("complete"); ``progress(done, total)`` is called on rank 0 with the whole job's count.
    Call :func:`dinokit.distributed.init_from_env` first to run distributed.
    """
    opts = _options(options, overrides)
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    model = _as_model(model)
    out = Path(out)
    source = open_source(images, follow_links=opts.follow_links)
    _same_on_all_ranks(source.digest(), f"{source.spec}: the ranks listed different inputs "
                                        "(files changing during the run?)")
    dev = _device(model, opts.device)
    was_training = model.training
    model = model.to(dev).eval()
    with _restore_mode(model, was_training):
        job = _job_description(model, dev, source, opts, shard_size, format)
        _on_rank0_then_all(lambda: _start_job(out, job, resume))
        plan = plan_shards(len(source), shard_size)
        records = _run_my_shards(model, dev, source, out, plan, opts, job, resume, progress)
    parts = cast(list[list[dict[str, Any]]], distributed.all_gather_object(records))
    result: dict[str, Any] | str | None = None
    if distributed.is_main_process():
        try:
            result = _finish_job(out, job, plan, source, [r for part in parts for r in part])
        except (OSError, RuntimeError) as e:  # told to every rank, so none waits for a manifest
            result = str(e)
        if progress is not None:
            progress(len(source), len(source))
    result = distributed.broadcast_object(result)  # type: ignore[assignment]
    if not isinstance(result, dict):
        raise RuntimeError(str(result))
    return result


def _same_on_all_ranks(value: str, message: str) -> None:
    if len(set(distributed.all_gather_object(value))) > 1:
        raise RuntimeError(message)


def _on_rank0_then_all(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only; an error there is raised on every rank (so none waits forever)."""
    error: str | None = None
    if distributed.is_main_process():
        try:
            fn()
        except (OSError, ValueError) as e:
            error = str(e)
    error = distributed.broadcast_object(error)  # type: ignore[assignment]
    if error:
        raise ValueError(error)


def _job_description(model: nn.Module, dev: torch.device, source: Source, opts: EmbedOptions,
                     shard_size: int, fmt: str) -> dict[str, Any]:
    """The manifest's job fields: what ``--resume`` must find unchanged."""
    pre = preprocessing_config(model, opts.image_size)
    x = torch.zeros(1, 3, pre["crop_size"], pre["crop_size"], device=dev)
    with torch.inference_mode():  # one dummy image gives the row shape, patch features included
        shape = list(compute_features(model, x, opts.features).shape[1:])
    return {
        "format_version": FORMAT_VERSION, "inputs": source.describe(), "model": _identity(model),
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()},
        "features": opts.features, "feature_shape": shape, "dtype": "float32",
        "format": fmt, "shard_size": shard_size,
        # bf16 and fp32 features differ (cosine ~0.9999): a resume must not mix them in one folder
        "compute": {"runtime": opts.runtime,
                    "precision": "fp32" if opts.runtime == "onnx" else embed_precision(dev, opts.precision)},
    }


def _start_job(out: Path, job: dict[str, Any], resume: bool) -> None:
    """Rank 0: refuse to mix jobs in one folder, clean a killed run's temp files, mark the job running."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    old = read_manifest(out) if (out / MANIFEST).is_file() else None
    has_shards = out.is_dir() and any(out.glob("shard-*"))
    if (old is not None or has_shards) and not resume:
        raise FileExistsError(f"{out}: holds an earlier embedding job; pass --resume to continue it "
                              "or choose another folder")
    if old is not None and (field_name := job_mismatch(old, job)) is not None:
        raise ValueError(f"{out}: --resume with a different {field_name} than the job in the folder; "
                         "use another folder")
    out.mkdir(parents=True, exist_ok=True)
    n = remove_stale_temp_files(out)
    if n:
        log.info("%s: removed %d temp files of a killed run", out, n)
    write_json(out / MANIFEST, {**job, "status": "running", "shards": []})


def _run_my_shards(model: nn.Module, dev: torch.device, source: Source, out: Path,
                   plan: list[tuple[int, int]], opts: EmbedOptions, job: dict[str, Any], resume: bool,
                   progress: Progress | None) -> list[dict[str, Any]]:
    """Write this rank's shards (keeping the complete ones when resuming); returns their records."""
    mine = my_shards(len(plan), distributed.get_rank(), distributed.get_world_size())
    records: list[dict[str, Any]] = []
    todo: list[int] = []
    for i in mine:
        rec = complete_record(out, i, len(plan), plan[i]) if resume else None
        if rec is not None:
            records.append(rec)
        else:
            todo.append(i)
    if resume:
        log.info("rank %d: %d shards complete, %d to do", distributed.get_rank(), len(records), len(todo))
    counter = distributed.Counter(str(distributed.broadcast_object(f"dinokit/embed/{uuid.uuid4().hex}")))
    total = len(source)
    done = counter.add(sum(plan[r["index"]][1] - plan[r["index"]][0] for r in records))
    report = progress if distributed.is_main_process() else None
    batches = [b for i in todo for b in _batches_of(*plan[i], opts.batch_size)]
    owners = [i for i in todo for _ in _batches_of(*plan[i], opts.batch_size)]
    dataset = SourceDataset(source, eval_transform(model, opts.image_size))
    inputs = _inputs(dataset, source, opts, dev, preprocessing_config(model, opts.image_size), batches)
    acc = _ShardBuffer(out, plan, source, job["format"], job["feature_shape"])
    features_of = _feature_fn(model, dev, opts, job["preprocessing"]["crop_size"])
    with torch.inference_mode():
        for owner, (y, idx, bad) in zip(owners, _forward(features_of, inputs, opts), strict=True):
            if acc.index is not None and owner != acc.index:
                records.append(acc.flush())
            acc.add(owner, y, idx, bad)
            done = counter.add(len(idx) + len(bad))
            if report is not None:
                report(done, total)
    if acc.index is not None:
        records.append(acc.flush())
    if report is not None and counter.shared:
        while (done := counter.value()) < total:  # the other ranks' work, until they are done
            report(done, total)
            time.sleep(0.2)
    return records


class _ShardBuffer:
    """The rows of the shard being filled; ``flush`` writes it (data, then its record)."""

    def __init__(self, out: Path, plan: list[tuple[int, int]], source: Source, fmt: str,
                 feature_shape: list[int]) -> None:
        self.out, self.plan, self.source, self.fmt, self.shape = out, plan, source, fmt, feature_shape
        self.index: int | None = None
        self.chunks: list[torch.Tensor] = []
        self.kept: list[int] = []
        self.skipped: list[Skipped] = []

    def add(self, index: int, y: torch.Tensor | None, kept: list[int], skipped: list[Skipped]) -> None:
        self.index = index
        if y is not None:
            self.chunks.append(y)
            self.kept.extend(kept)
        self.skipped.extend(skipped)

    def flush(self) -> dict[str, Any]:
        assert self.index is not None
        keys, meta = self.source.keys, self.source.metadata
        feats = torch.cat(self.chunks).numpy() if self.chunks else np.empty((0, *self.shape), np.float32)
        stem = shard_stem(self.index, len(self.plan))
        _log_skipped(self.skipped, f"{stem}: ")
        record = write_shard(self.out, self.index, len(self.plan), self.plan[self.index], feats,
                             [keys[i] for i in self.kept], {k: [v[i] for i in self.kept] for k, v in meta.items()},
                             [(keys[s.index], s.reason) for s in self.skipped], self.fmt)
        self.index, self.chunks, self.kept, self.skipped = None, [], [], []
        return record


def _finish_job(out: Path, job: dict[str, Any], plan: list[tuple[int, int]], source: Source,
                records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0: merge every rank's shard records into the final manifest, written atomically."""
    records = sorted(records, key=lambda r: int(r["index"]))
    missing = sorted(set(range(len(plan))) - {int(r["index"]) for r in records})
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:5]} missing after the run")
    listing = [{"path": p, "reason": r, "shard": None} for p, r in source.skipped]
    skipped = listing + [{**s, "shard": r["index"]} for r in records for s in r["skipped"]]
    manifest = {**job, "status": "complete", "world_size": distributed.get_world_size(),
                "rows": sum(int(r["rows"]) for r in records), "skipped": skipped, "shards": records}
    write_json(out / MANIFEST, manifest)
    log.info("%s: %d rows in %d shards, %d skipped", out, manifest["rows"], len(records), len(skipped))
    return manifest
