"""The only module that touches ``torch.distributed``: rank/world queries, reductions, setup.

Every function is a no-op (or the identity) in a single process, so training code calls them
unconditionally. Multi-process runs are started by ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT in the environment) and use NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    Returns True when running distributed (WORLD_SIZE > 1), False for a plain single process.
    Already-initialised groups are reused. ``backend`` defaults to nccl with CUDA, else gloo.
    """
    if is_initialized():
        return get_world_size() > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    # A group left to interpreter teardown can abort the process ("terminate called without an
    # active exception": gloo's worker threads destroyed while joinable), so the API's users, who
    # call train()/embed() and just exit, get it destroyed first. shutdown() is idempotent.
    atexit.register(shutdown)
    log.info("distributed: rank %d of %d (%s)", get_rank(), get_world_size(), backend)
    return True


def shutdown() -> None:
    """Leave the process group (idempotent; also run at exit for groups made by init_from_env)."""
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (identity in one process); returns it."""
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all ranks in place (identity in one process); returns it."""
    world = get_world_size()
    if world > 1:
        all_reduce_sum_(tensor)
        tensor.div_(world)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped (N, ...) tensors from all ranks along dim 0 (rank order)."""
    world = get_world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (identity in one process)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in one process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Counter:
    """A job-wide counter that ranks add to without waiting for each other (no collective call).

    It lives in the key-value store that torchrun's rendezvous already runs, so rank 0 can show one
    progress bar for the work of every rank. In one process it is a plain integer.
    """

    def __init__(self, key: str) -> None:
        self.key, self.local = key, 0
        self.store = None
        if get_world_size() > 1:
            # The default group's store is not public API; without it the count stays per rank.
            get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
            self.store = get_store() if get_store is not None else None

    @property
    def shared(self) -> bool:
        """True when the count covers every rank (False: this rank's count, scaled by the world size)."""
        return self.store is not None

    def add(self, n: int) -> int:
        """Add ``n`` and return the job-wide total so far."""
        self.local += n
        if self.store is None:
            return self.local * get_world_size() if get_world_size() > 1 else self.local
        return int(self.store.add(self.key, n))

    def value(self) -> int:
        return self.add(0)


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` when running distributed, else ``module`` itself."""
    if get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Convert BatchNorm layers to SyncBatchNorm when distributed on CUDA (as the official code does)."""
    if get_world_size() > 1 and torch.cuda.is_available():
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module
