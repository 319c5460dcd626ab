"""Training data: batches of multi-crop views, deterministic per (seed, epoch, iteration/sample).

Every random choice is drawn from a generator seeded by the run seed, the epoch and the iteration
(tensor pipeline) or the sample index (PIL pipeline), so a resumed run sees exactly the batches an
uninterrupted run would, for any number of DataLoader workers. A distributed run splits each global
batch (``batch_size_per_gpu * world_size`` images, drop_last) into contiguous per-rank shards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinokit.data.multicrop import MultiCropSpec, PILMultiCrop, TensorMultiCrop
from dinokit.training.config import TrainConfig

log = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) for mixing seeds


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, iteration, ...); distinct inputs give unrelated seeds."""
    h = 0
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of the n samples for one epoch (the same on every rank)."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 1))
    return torch.randperm(n, generator=g)


class TrainData:
    """Source of per-iteration multi-crop batches for one rank."""

    num_samples: int
    iterations_per_epoch: int
    global_batch: int

    def batches(self, start_iteration: int, total_iterations: int) -> Iterator[list[torch.Tensor]]:
        """Views for global iterations start..total-1: lists of (b, 3, S, S) tensors on the device."""
        raise NotImplementedError


def _check_size(n: int, global_batch: int, source: str) -> int:
    if n < global_batch:
        raise ValueError(f"{source}: {n} images but the total batch is {global_batch} "
                         "(optim.batch_size_per_gpu x processes); use a smaller batch")
    return n // global_batch


class TensorTrainData(TrainData):
    """In-memory uint8 images (N, C, H, W) on the training device, augmented batch-wise on tensors."""

    def __init__(self, images: torch.Tensor, spec: MultiCropSpec, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False, out_dtype: torch.dtype = torch.float32,
                 source: str = "") -> None:
        self.images = images
        self.aug = TensorMultiCrop(spec, out_dtype=out_dtype)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.num_samples = int(images.shape[0])
        self.iterations_per_epoch = _check_size(self.num_samples, self.global_batch, source)
        self.channels_last = channels_last

    def batches(self, start_iteration: int, total_iterations: int) -> Iterator[list[torch.Tensor]]:
        ipe = self.iterations_per_epoch
        perm, perm_epoch = None, -1
        for it in range(start_iteration, total_iterations):
            epoch, i = divmod(it, ipe)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(self.num_samples, self.seed, epoch), epoch
            assert perm is not None
            lo = i * self.global_batch + self.rank * self.batch_size
            idx = perm[lo:lo + self.batch_size].to(self.images.device)
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i, 2))
            crops = self.aug(self.images.index_select(0, idx), gen, total=self.global_batch,
                             offset=self.rank * self.batch_size)
            if self.channels_last:
                crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
            yield crops


class _PILDataset(torch.utils.data.Dataset):
    """Item (epoch, index) -> list of view tensors; a failing image is replaced by the next one."""

    def __init__(self, items: Sequence[Any], spec: MultiCropSpec, seed: int) -> None:
        self.items = items
        self.aug = PILMultiCrop(spec)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, index: int) -> Any:
        from PIL import Image

        from dinokit.data.images import ImageError, load_rgb

        for k in range(16):
            item = self.items[(index + k) % len(self.items)]
            if isinstance(item, np.ndarray):
                return Image.fromarray(item)
            try:
                return load_rgb(item)
            except ImageError as e:
                log.warning("%s (skipped; using the next image)", e)
        raise ValueError(f"{self.items[index]}: this and the next 15 images cannot be read")

    def __getitem__(self, key: tuple[int, int]) -> list[torch.Tensor]:
        epoch, index = key
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index, 3))
        return self.aug(self._image(index), gen)


class _ShardBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's [(epoch, index), ...] for each global iteration in [start, total)."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, ipe: int, start: int,
                 total: int) -> None:
        self.n, self.b, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.ipe, self.start, self.total = ipe, start, total

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, perm_epoch = None, -1
        for it in range(self.start, self.total):
            epoch, i = divmod(it, self.ipe)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(self.n, self.seed, epoch).tolist(), epoch
            assert perm is not None
            lo = i * self.b * self.world + self.rank * self.b
            yield [(epoch, j) for j in perm[lo:lo + self.b]]


def _collate_views(items: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(views) for views in zip(*items, strict=True)]


class PILTrainData(TrainData):
    """Image files (or in-memory arrays) augmented per image with PIL in DataLoader workers."""

    def __init__(self, items: Sequence[Any], spec: MultiCropSpec, batch_size: int, seed: int, device: torch.device,
                 num_workers: int = 2, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 source: str = "") -> None:
        self.dataset = _PILDataset(items, spec, seed)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.num_samples = len(items)
        self.iterations_per_epoch = _check_size(self.num_samples, self.global_batch, source)
        self.device, self.num_workers, self.channels_last = device, num_workers, channels_last

    def batches(self, start_iteration: int, total_iterations: int) -> Iterator[list[torch.Tensor]]:
        sampler = _ShardBatchSampler(self.num_samples, self.batch_size, self.world, self.rank, self.seed,
                                     self.iterations_per_epoch, start_iteration, total_iterations)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=_collate_views,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for crops in loader:
            yield [c.to(self.device, non_blocking=True).contiguous(memory_format=fmt) for c in crops]


def build_train_data(cfg: TrainConfig, device: torch.device, rank: int = 0, world_size: int = 1,
                     channels_last: bool = False) -> TrainData:
    """The data source a config names: ``fashion-mnist[...]`` (tensor pipeline by default) or an image folder."""
    from dinokit.data.fashion_mnist import is_fashion_mnist_spec, load_spec

    d = cfg.data
    spec = MultiCropSpec.from_config(d)
    b = cfg.optim.batch_size_per_gpu
    if is_fashion_mnist_spec(d.source):
        images, _ = load_spec(d.source, "train")
        if d.limit is not None:
            images = images[: d.limit]
        if d.augment == "pil":
            return PILTrainData(list(images), spec, b, cfg.seed, device, d.num_workers, rank, world_size,
                                channels_last, d.source)
        t = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1).to(device)  # (N, 1, 28, 28) uint8
        return TensorTrainData(t, spec, b, cfg.seed, rank, world_size, channels_last, source=d.source)
    from dinokit.data.images import list_images

    root = Path(d.source)
    paths = list_images(root)
    if not paths:
        raise ValueError(f"{root}: no image files found")
    if d.limit is not None:
        paths = paths[: d.limit]
    if d.augment == "tensor":
        raise ValueError(f"{root}: data.augment=tensor needs in-memory data (fashion-mnist); "
                         "image folders use the pil pipeline in DataLoader workers")
    return PILTrainData(paths, spec, b, cfg.seed, device, d.num_workers, rank, world_size, channels_last, str(root))
