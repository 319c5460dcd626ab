"""Epoch-end callbacks: functions of the teacher backbone whose records go to log_knn.jsonl.

A callback is any ``callback(backbone) -> dict | None`` (None: nothing to record). An optional
``every_epochs`` attribute says how often it runs (default 1; 0: only at the end). Every callback
also runs once at the end of training unless it just ran at that iteration. The k-NN monitor
(:class:`dinokit.eval.monitor.KNNMonitor`) is one; training itself knows nothing of evaluation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Protocol

import torch
from torch import nn

log = logging.getLogger(__name__)


class EpochCallback(Protocol):
    def __call__(self, backbone: nn.Module) -> Mapping[str, Any] | None: ...


class Callbacks:
    """Runs epoch-end callbacks when due and stamps their records with epoch, iteration and times."""

    def __init__(self, callbacks: Sequence[EpochCallback], compiled: bool = False) -> None:
        self.items = list(callbacks)
        self.compiled = compiled
        self.last_iteration = [-1] * len(self.items)

    def at_epoch_end(self, backbone: nn.Module, epoch: int, iteration: int, elapsed_s: float) -> list[dict[str, Any]]:
        """Records of the callbacks due after ``epoch`` completed epochs."""
        due = [i for i, cb in enumerate(self.items)
               if (every := int(getattr(cb, "every_epochs", 1))) > 0 and epoch % every == 0]
        return self._run(due, backbone, epoch, iteration, elapsed_s)

    def at_end(self, backbone: nn.Module, epoch: int, iteration: int, elapsed_s: float) -> list[dict[str, Any]]:
        """Records of every callback that has not run at this final iteration yet."""
        due = [i for i in range(len(self.items)) if self.last_iteration[i] != iteration]
        return self._run(due, backbone, epoch, iteration, elapsed_s)

    def _run(self, due: list[int], backbone: nn.Module, epoch: int, iteration: int,
             elapsed_s: float) -> list[dict[str, Any]]:
        records = []
        for i in due:
            t0 = time.perf_counter()
            # eval batches have other shapes than training ones: run a compiled backbone eagerly (no recompiles)
            with torch.compiler.set_stance("force_eager") if self.compiled else nullcontext():
                res = self.items[i](backbone)
            self.last_iteration[i] = iteration
            if res is not None:
                records.append({"epoch": epoch, "iteration": iteration, **res, "time_s": elapsed_s,
                                "eval_time_s": time.perf_counter() - t0})
        return records
