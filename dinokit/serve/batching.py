"""Dynamic batching: image queries that arrive within a few milliseconds share one forward pass.

Requests put their preprocessed image on an asyncio queue and await a future. One collector task
takes the first waiting image, then keeps taking more until ``max_batch`` images are gathered or
``max_wait_ms`` has passed, and runs the forward on a single model thread. While that forward runs,
new requests queue up, so under load every batch is already full when the model is free again: the
model runs at batch throughput, and an idle server adds at most ``max_wait_ms`` to a lone query.
``max_batch=1`` is the per-request mode (one forward per request, as clip-retrieval's back end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)


class Embedder:
    """A model with its eval preprocessing and feature kind: PIL images -> unit-norm float32 vectors.

    The eval transform of ``dinokit.embed`` (:func:`dinokit.data.transforms.eval_transform`: resize,
    center crop, to [0, 1], normalize) is split in two: the PIL part runs per request on the request's
    thread (:meth:`preprocess` -> uint8 (3, S, S), no torch math, so 32 concurrent requests do not each
    start an OpenMP team beside the model), the float part runs once per batch on the model thread
    (:meth:`forward`), with the same operations in the same order as ToTensor + Normalize.
    """

    def __init__(self, model: nn.Module, *, feature: str = "cls", image_size: int | None = None,
                 device: str | torch.device | None = None) -> None:

        from dinokit.data.transforms import pixel_transform, preprocessing_config
        from dinokit.devices import resolve_device
        from dinokit.embedding import check_features

        self.feature = check_features(feature)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        p = preprocessing_config(model, image_size)
        self.pixels = pixel_transform(p)
        # JPEG queries are decoded at the smallest DCT scale that keeps 2x the resize target (limits.decode_image)
        self.draft_to = 2 * int(p["resize_size"])
        self.mean, self.std = p["mean"], p["std"]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image (any mode) -> the resized, center-cropped RGB pixels, uint8 (3, S, S)."""
        return self.pixels(image)

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """uint8 pixels (B, 3, S, S) -> L2-normalized features (B, D) float32 (cosine = inner product)."""
        from dinokit.data.transforms import normalize_pixels
        from dinokit.embedding import compute_features

        x = normalize_pixels(x, self.mean, self.std)
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.device.type == "cuda"):
            y = compute_features(self.model, x.to(self.device), self.feature)
        rows = y.float().cpu().numpy().reshape(len(x), -1)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0).astype(np.float32)


class _Collector:
    """An asyncio queue drained in batches by one worker thread: the common part of both batchers.

    Subclasses define ``_process(items) -> results`` (run on the worker thread, one result per item).
    """

    def __init__(self, *, max_batch: int, max_wait_ms: float, name: str,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms}: must be >= 0")
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.on_batch = on_batch
        self._name = name
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] | None = None
        self._task: asyncio.Task[None] | None = None
        # one thread does the work: batches never overlap, so each gets all the cores
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def start(self) -> None:
        """Start the collector on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    async def _submit(self, item: Any) -> Any:
        if self._queue is None:
            raise RuntimeError(f"{type(self).__name__}.start() was not called")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _collect(self) -> list[tuple[Any, asyncio.Future[Any]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:  # whatever queued while the last batch ran is taken at once
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    def _process(self, items: list[Any]) -> list[Any]:
        raise NotImplementedError

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(x, f) for x, f in batch if not f.done()]  # a client that went away was cancelled
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._pool, self._process, [x for x, _ in live])
            except Exception as e:  # every waiting request gets the error (ValueError -> 422 upstream)
                if not isinstance(e, (ValueError, KeyError)):
                    log.exception("%s: a batch of %d failed", self._name, len(live))
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(live), time.perf_counter() - t0)
            for (_, f), y in zip(live, results, strict=True):
                if f.done():
                    continue
                if isinstance(y, Exception):  # one group of a batch failed, the others did not
                    f.set_exception(y)
                else:
                    f.set_result(y)


class Batcher(_Collector):
    """Collects single images into batches for one model thread (see the module docstring).

    ``on_batch(size, seconds)`` is called after each forward (for metrics).
    """

    def __init__(self, embedder: Embedder, *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        super().__init__(max_batch=max_batch, max_wait_ms=max_wait_ms, name="dinokit-model", on_batch=on_batch)
        self.embedder = embedder

    async def embed(self, x: torch.Tensor) -> np.ndarray:
        """One preprocessed image (3, S, S) -> its feature vector (D,), computed in a shared batch."""
        return await self._submit(x)

    async def embed_many(self, xs: list[torch.Tensor]) -> np.ndarray:
        """Several images (e.g. one upload of many files) -> (N, D); they join the shared batches."""
        if not xs:
            return np.zeros((0, 0), np.float32)
        return np.stack(await asyncio.gather(*(self.embed(x) for x in xs)))

    def _process(self, items: list[torch.Tensor]) -> list[np.ndarray]:
        return list(self.embedder.forward(torch.stack(items)))


class SearchBatcher(_Collector):
    """Vector queries waiting together share one index search: ``search(x (Q, D), k, filter)`` runs on
    one search thread for each group of equal (k, filter). Nothing waits on purpose (max wait 0): under
    load the queue fills while the previous search runs, so batches form by themselves, and one thread
    hop and one FAISS call serve many requests."""

    def __init__(self, search: Callable[[np.ndarray, int, Any], list[Any]], *, max_batch: int = 256) -> None:
        super().__init__(max_batch=max_batch, max_wait_ms=0.0, name="dinokit-search")
        self.search_fn = search

    async def search(self, x: np.ndarray, k: int, filt: dict[str, Any] | None) -> Any:
        """One query vector (D,) -> its hits, searched together with the queries queued beside it."""
        return await self._submit((x, k, filt))

    def _process(self, items: list[tuple[np.ndarray, int, Any]]) -> list[Any]:
        groups: dict[tuple[int, str | None], list[int]] = {}
        for i, (_, k, filt) in enumerate(items):
            groups.setdefault((k, None if filt is None else json.dumps(filt, sort_keys=True)), []).append(i)
        out: list[Any] = [None] * len(items)
        for idx in groups.values():
            k, filt = items[idx[0]][1], items[idx[0]][2]
            try:
                rows = self.search_fn(np.stack([items[i][0] for i in idx]), k, filt)
            except Exception as e:
                rows = [e] * len(idx)
            for i, row in zip(idx, rows, strict=True):
                out[i] = row
        return out
