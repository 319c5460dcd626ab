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
from typing import Any

import numpy as np
import torch
from torch import nn

from dinokit._io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"


def epoch_checkpoint_name(epoch: int) -> str:
    return f"checkpoint_{epoch:04d}.pth"


def rng_state() -> dict[str, Any]:
    """torch CPU/CUDA states as tensors, numpy and python states as plain lists (weights_only-safe)."""
    np_state = np.random.get_state()
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
    from dinokit.hub import read_checkpoint

    ckpt = read_checkpoint(path)
    missing = [k for k in ("student", "teacher", "optimizer", "iteration", "dino_loss", "config") if k not in ckpt]
    if not isinstance(ckpt, dict) or missing:
        raise ValueError(f"{path}: not a dinokit training checkpoint (missing {', '.join(missing)})")
    return ckpt
