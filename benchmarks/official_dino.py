"""The REAL official DINO training step, imported at benchmark time from a local snapshot.

Nothing of the official code is copied here or committed: :func:`load` puts the snapshot's folder on
``sys.path`` and imports its ``main_dino``, ``utils`` and ``vision_transformer`` unchanged. Get a
snapshot with e.g. ``git clone https://github.com/facebookresearch/dino /tmp/dino-official``.

What this module adds around the official code, so that it runs in one CPU process:

- :func:`cpu_shims`: ``Tensor.cuda`` returns the tensor itself and ``torch.cuda.synchronize`` does
  nothing (``train_one_epoch`` calls both unconditionally); a one-process gloo group so that
  ``DINOLoss.update_center``'s ``dist.all_reduce`` and the student's ``DistributedDataParallel``
  work as in a 1-GPU run; ``utils.is_dist_avail_and_initialized`` answers False so that the
  end-of-epoch ``MetricLogger`` sync (which allocates on ``cuda``) is skipped (world size 1: a no-op).
- :func:`build`: the student, teacher, loss, optimizer and schedules exactly as ``train_dino`` builds
  them (its model construction, DDP wrapping, parameter groups and cosine schedules), for a given
  ViT shape, since ``train_dino`` itself needs an ImageFolder and runs a whole training.
- :func:`augmentation`: the official ``DataAugmentationDINO``; for crop sizes other than 224/96
  (the Fashion-MNIST config) the ``size`` of its ``RandomResizedCrop`` steps is set after
  construction (a parameter, the code is unchanged).
"""

from __future__ import annotations

import importlib
import itertools
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn


@dataclass
class Official:
    main_dino: ModuleType
    utils: ModuleType
    vits: ModuleType
    commit: str


def load(repo: str | Path) -> Official:
    """Import ``main_dino``, ``utils`` and ``vision_transformer`` from the snapshot folder ``repo``."""
    root = Path(repo).expanduser().resolve()
    if not (root / "main_dino.py").is_file():
        raise FileNotFoundError(f"{root}: no main_dino.py (expected a facebookresearch/dino snapshot)")
    sys.path.insert(0, str(root))
    main_dino = importlib.import_module("main_dino")
    utils = importlib.import_module("utils")
    vits = importlib.import_module("vision_transformer")
    for mod in (main_dino, utils, vits):  # the snapshot's modules, not a same-named installed one
        if Path(mod.__file__).resolve().parent != root:
            raise ImportError(f"{mod.__name__} was imported from {mod.__file__}, not from {root}")
    return Official(main_dino, utils, vits, _commit(root))


def _commit(root: Path) -> str:
    """The snapshot's commit where it is a git checkout (``.git/HEAD`` or the ref it names)."""
    head = root / ".git" / "HEAD"
    if not head.is_file():
        return "snapshot without .git"
    text = head.read_text().strip()
    if text.startswith("ref:"):
        ref = root / ".git" / text.split(None, 1)[1]
        return ref.read_text().strip() if ref.is_file() else text
    return text


@contextmanager
def cpu_shims(off: Official) -> Iterator[None]:
    """Let the official CUDA-only training loop run unchanged in one CPU process (see the module doc)."""
    import torch.distributed as dist

    saved_cuda, saved_sync = torch.Tensor.cuda, torch.cuda.synchronize
    saved_dist = off.utils.is_dist_avail_and_initialized
    tmp = tempfile.mkdtemp(prefix="dino-official-pg-")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.cuda.synchronize = lambda *a, **k: None
    off.utils.is_dist_avail_and_initialized = lambda: False
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.synchronize = saved_cuda, saved_sync  # type: ignore[method-assign]
        off.utils.is_dist_avail_and_initialized = saved_dist
        if started:
            dist.destroy_process_group()


def _vit(off: Official, vit: dict[str, Any], drop_path_rate: float) -> nn.Module:
    """The official ViT (its ``vit_small`` settings: qkv bias, LayerNorm eps 1e-6) of the given shape."""
    return off.vits.VisionTransformer(
        img_size=[vit["img_size"]], patch_size=vit["patch_size"], embed_dim=vit["embed_dim"], depth=vit["depth"],
        num_heads=vit["num_heads"], mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=drop_path_rate)


def build(off: Official, vit: dict[str, Any], out_dim: int, ncrops: int, batch: int, iters_per_epoch: int,
          epochs: int = 2, drop_path_rate: float = 0.1) -> dict[str, Any]:
    """Everything ``train_one_epoch`` takes, built as ``train_dino`` builds it (ViT, default args).

    Call inside :func:`cpu_shims` (the student is wrapped in ``DistributedDataParallel``).
    """
    utils, main_dino = off.utils, off.main_dino
    student = utils.MultiCropWrapper(_vit(off, vit, drop_path_rate),
                                     off.vits.DINOHead(vit["embed_dim"], out_dim, use_bn=False, norm_last_layer=True))
    teacher = utils.MultiCropWrapper(_vit(off, vit, 0.0), off.vits.DINOHead(vit["embed_dim"], out_dim, False))
    student = nn.parallel.DistributedDataParallel(student)
    teacher.load_state_dict(student.module.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = main_dino.DINOLoss(out_dim, ncrops, 0.04, 0.04, 0, epochs)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    lr = utils.cosine_scheduler(0.0005 * batch / 256.0, 1e-6, epochs, iters_per_epoch, warmup_epochs=1)
    wd = utils.cosine_scheduler(0.04, 0.4, epochs, iters_per_epoch)
    momentum = utils.cosine_scheduler(0.996, 1, epochs, iters_per_epoch)
    args = _Args(epochs=epochs, clip_grad=3.0, freeze_last_layer=1)
    return {"student": student, "teacher": teacher, "teacher_without_ddp": teacher, "dino_loss": dino_loss,
            "optimizer": optimizer, "lr_schedule": lr, "wd_schedule": wd, "momentum_schedule": momentum,
            "fp16_scaler": None, "args": args}


@dataclass
class _Args:
    """The three fields of main_dino's argparse namespace that ``train_one_epoch`` reads."""

    epochs: int
    clip_grad: float
    freeze_last_layer: int


def augmentation(off: Official, global_scale: tuple[float, float], local_scale: tuple[float, float],
                 local_number: int, global_size: int = 224, local_size: int = 96) -> Any:
    """The official ``DataAugmentationDINO``; other crop sizes set on its RandomResizedCrop steps."""
    aug = off.main_dino.DataAugmentationDINO(global_scale, local_scale, local_number)
    for compose, size in ((aug.global_transfo1, global_size), (aug.global_transfo2, global_size),
                          (aug.local_transfo, local_size)):
        compose.transforms[0].size = (size, size)
    return aug


class TimedLoader:
    """A ``data_loader`` for ``train_one_epoch`` over ready batches that records when each is asked for.

    ``stamps[i + 1] - stamps[i]`` is the wall time of iteration ``i`` (the loop body runs between two
    requests; the last stamp is taken when the loop asks for a batch past the end).
    """

    def __init__(self, batches: list[list[torch.Tensor]]) -> None:
        self.batches = batches
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []  # process CPU seconds (all threads) at the same moments

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], None]]:
        import time

        for crops in self.batches:
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())
            yield crops, None
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())

    def step_times(self, cpu: bool = False) -> list[float]:
        s = self.cpu_stamps if cpu else self.stamps
        return [b - a for a, b in itertools.pairwise(s)]


def train_epoch(off: Official, parts: dict[str, Any], loader: TimedLoader, epoch: int = 1) -> dict[str, Any]:
    """One official ``train_one_epoch`` over ``loader`` (epoch 1: the last layer is not frozen any more)."""
    return off.main_dino.train_one_epoch(
        parts["student"], parts["teacher"], parts["teacher_without_ddp"], parts["dino_loss"], loader,
        parts["optimizer"], parts["lr_schedule"], parts["wd_schedule"], parts["momentum_schedule"], epoch,
        parts["fp16_scaler"], parts["args"])
