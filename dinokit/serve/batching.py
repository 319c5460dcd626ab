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
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)


class Embedder:
    """A model with its eval preprocessing and feature kind: PIL images -> unit-norm float32 vectors."""

    def __init__(self, model: nn.Module, *, feature: str = "cls", image_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        from dinokit.data.transforms import eval_transform
        from dinokit.devices import resolve_device
        from dinokit.embedding import check_features

        self.feature = check_features(feature)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.transform = eval_transform(model, image_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image (any mode) -> the model's eval input (3, S, S); the same recipe ``dinokit.embed`` uses."""
        return self.transform(image)

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) -> L2-normalized features (B, D) float32 (cosine = inner product)."""
        from dinokit.embedding import compute_features

        with torch.inference_mode(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.device.type == "cuda"):
            y = compute_features(self.model, x.to(self.device), self.feature)
        y = y.float().cpu().numpy().reshape(len(x), -1)
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        return np.divide(y, norms, out=np.zeros_like(y), where=norms > 0).astype(np.float32)


class Batcher:
    """Collects single images into batches for one model thread (see the module docstring).

    ``on_batch(size, seconds)`` is called after each forward (for metrics).
    """

    def __init__(self, embedder: Embedder, *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms}: must be >= 0")
        self.embedder = embedder
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future[np.ndarray]]] | None = None
        self._task: asyncio.Task[None] | None = None
        # one thread owns the model: forwards never overlap, so each gets all the cores
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinokit-model")

    async def start(self) -> None:
        """Start the collector on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="dinokit-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    async def embed(self, x: torch.Tensor) -> np.ndarray:
        """One preprocessed image (3, S, S) -> its feature vector (D,), computed in a shared batch."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((x, fut))
        return await fut

    async def embed_many(self, xs: list[torch.Tensor]) -> np.ndarray:
        """Several images (e.g. one upload of many files) -> (N, D); they join the shared batches."""
        if not xs:
            return np.zeros((0, 0), np.float32)
        return np.stack(await asyncio.gather(*(self.embed(x) for x in xs)))

    async def _collect(self) -> list[tuple[torch.Tensor, asyncio.Future[np.ndarray]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:  # whatever queued while the last forward ran is taken at once
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

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(x, f) for x, f in batch if not f.done()]  # a client that went away was cancelled
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                feats = await loop.run_in_executor(self._pool, self.embedder.forward,
                                                   torch.stack([x for x, _ in live]))
            except Exception as e:  # the forward failed: every waiting request gets the error
                log.exception("forward of a batch of %d failed", len(live))
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(live), time.perf_counter() - t0)
            for (_, f), y in zip(live, feats, strict=True):
                if not f.done():
                    f.set_result(y)

