"""Training checkpoints: one torch.save dict of tensors and primitives, written atomically.

Layout (``torch.load(path, weights_only=True)``): student / teacher state dicts (``backbone.*``,
``head.*`` with the official ``last_layer.weight_g/weight_v`` names), optimizer state, epoch,
iteration, ``dino_loss.center``, config and backbone config as JSON strings, RNG states, the fp16
scaler state, the precision in use and the training time so far. See /work/notes/train_format.md.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from dinokit._io import atomic_path
from dinokit.hub import read_checkpoint
from dinokit.training.config import TrainConfig
from dinokit.training.models import checkpoint_backbone_config

if TYPE_CHECKING:  # state.py imports the loop's pieces; only its type is needed here
    from dinokit.training.state import TrainState

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"


def epoch_checkpoint_name(epoch: int) -> str:
    return f"checkpoint_{epoch:04d}.pth"


def rng_state() -> dict[str, Any]:
    """torch CPU/CUDA states as tensors, numpy and python states as plain lists (weights_only-safe)."""
    np_state = cast(tuple[Any, ...], np.random.get_state())  # the legacy tuple form
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save to a temp file in the same folder, then os.replace: a crash never leaves half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the rename must not land before the data


def make_checkpoint(*, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    iteration: int, center: torch.Tensor, config_json: str, backbone_config: Mapping[str, Any],
                    scaler: Any, precision: str, time_s: float) -> dict[str, Any]:
    """The checkpoint dict (CPU tensors) for the given training state."""

    def cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in sd.items()}

    return {
        "student": cpu(student.state_dict()),
        "teacher": cpu(teacher.state_dict()),
        "optimizer": _to_cpu(optimizer.state_dict()),
        "epoch": int(epoch),
        "iteration": int(iteration),
        "dino_loss": {"center": center.detach().cpu().clone()},
        "config": config_json,
        "backbone_config": json.dumps(backbone_config),
        "rng": rng_state(),
        "fp16_scaler": scaler.state_dict() if scaler is not None else None,
        "precision": precision,
        "time_s": float(time_s),
    }


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint safely; raise ValueError("PATH: reason") when it is not one."""
    ckpt = read_checkpoint(path)
    missing = [k for k in ("student", "teacher", "optimizer", "iteration", "dino_loss", "config") if k not in ckpt]
    if not isinstance(ckpt, dict) or missing:
        raise ValueError(f"{path}: not a dinokit training checkpoint (missing {', '.join(missing)})")
    return ckpt


# keys that may change between a run and its resume (they do not change the maths)
RESUME_FREE = ("max_iterations", "max_minutes", "knn", "log_every", "checkpoint_every", "saveckp_freq",
               "num_threads", "device", "compile", "data.num_workers")


class Checkpointer:
    """The checkpoints of one run folder: checkpoint.pth (and checkpoint_EPOCH.pth), resume checks.

    Every process reads; only the one with ``enabled`` (rank 0) writes. Writes are atomic.
    """

    def __init__(self, run_dir: str | os.PathLike[str], cfg: TrainConfig, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / CHECKPOINT_NAME
        self.cfg, self.enabled = cfg, enabled
        self.last_saved = -1  # iteration of the last write by this process
        self._backbone_config: dict[str, Any] | None = None

    def open(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to continue from (its config checked against ours), or None for a new run.

        A new run never overwrites an old one: ValueError when the folder already holds a checkpoint.
        """
        if resume and self.path.is_file():
            ckpt = load_checkpoint(self.path)
            check_resume_compatible(TrainConfig.from_json(ckpt["config"]), self.cfg, self.path)
            return ckpt
        if resume:
            log.warning("%s: no checkpoint to resume from; starting a new run", self.path)
        elif self.path.is_file():
            raise ValueError(f"{self.path}: the run folder already holds a run; continue it with resume=True "
                             "(--resume) or choose another output folder")
        return None

    def restore(self, state: TrainState, ckpt: Mapping[str, Any]) -> float:
        """Load networks, optimizer, center, RNG and iteration into ``state``; returns the training seconds so far.

        The precision and fp16 scaler state are read by the caller (``ckpt["precision"]``, ``["fp16_scaler"]``).
        """
        state.student.load_state_dict(ckpt["student"])
        state.teacher.load_state_dict(ckpt["teacher"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.loss_fn.center.copy_(ckpt["dino_loss"]["center"].to(state.device))
        set_rng_state(ckpt["rng"])
        state.iteration = int(ckpt["iteration"])
        self.last_saved = state.iteration
        log.info("resumed %s at iteration %d (epoch %d)", self.path, state.iteration,
                 state.iteration // state.iterations_per_epoch)
        return float(ckpt.get("time_s", 0.0))

    def save(self, state: TrainState, elapsed_s: float) -> None:
        """Write checkpoint.pth, and checkpoint_EPOCH.pth at every ``saveckp_freq``-th epoch end."""
        it = state.iteration
        self.last_saved = it
        if not self.enabled:
            return
        if self._backbone_config is None:
            self._backbone_config = checkpoint_backbone_config(state.teacher.backbone)
        epoch = it // state.iterations_per_epoch
        ck = make_checkpoint(
            student=state.student, teacher=state.teacher, optimizer=state.optimizer, epoch=epoch, iteration=it,
            center=state.loss_fn.center, config_json=self.cfg.to_json(), backbone_config=self._backbone_config,
            scaler=state.scaler, precision=state.precision, time_s=elapsed_s)
        atomic_torch_save(ck, self.path)
        freq = self.cfg.saveckp_freq
        if freq and it % state.iterations_per_epoch == 0 and epoch % freq == 0:
            atomic_torch_save(ck, self.run_dir / epoch_checkpoint_name(epoch))

    def last_good(self) -> str:
        """Where the last good checkpoint is, for error messages."""
        return str(self.path) if self.path.is_file() else "none written yet"


def check_resume_compatible(old: TrainConfig, new: TrainConfig, path: str | os.PathLike[str]) -> None:
    """ValueError naming the keys when ``new`` changes the maths of the run ``old`` started."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == f or k.startswith(f + ".") for f in RESUME_FREE)]
    if diff:
        raise ValueError(f"{path}: the run was started with a different config ({', '.join(diff[:5])}); "
                         "resume with the same recipe (only limits, logging, k-NN and device settings may change)")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model_args":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
