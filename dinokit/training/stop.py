"""When a run stops early: ``max_iterations`` and ``max_minutes`` of training time, the same on every rank."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dinokit import distributed
from dinokit.training.config import TrainConfig


class Clock:
    """Training seconds: those of earlier (resumed) sessions plus this one's since the clock was made."""

    def __init__(self, before_s: float = 0.0) -> None:
        self.before_s = before_s
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.before_s + time.perf_counter() - self.t0


@dataclass(frozen=True)
class StopPolicy:
    """Stop after ``max_iterations`` iterations in total or ``max_minutes`` of training time (None: no limit)."""

    max_iterations: int | None = None
    max_minutes: float | None = None
    device: str | torch.device = "cpu"  # where the all-reduce runs (the process group's device)

    @classmethod
    def from_config(cls, cfg: TrainConfig, device: torch.device) -> StopPolicy:
        return cls(cfg.max_iterations, cfg.max_minutes, device)

    def reason(self, iteration: int, elapsed_s: float) -> str | None:
        """"max_iterations", "max_minutes" or None after ``iteration`` iterations and ``elapsed_s`` seconds.

        Clocks differ between processes, so the time limit is all-reduced: when any rank is over it,
        every rank stops at this same iteration.
        """
        if self.max_iterations is not None and iteration >= self.max_iterations:
            return "max_iterations"
        if self.max_minutes is None:
            return None
        over = torch.tensor([1.0 if elapsed_s >= self.max_minutes * 60 else 0.0])
        if distributed.get_world_size() > 1:
            over = distributed.all_reduce_sum_(over.to(self.device)).cpu()
        return "max_minutes" if over.item() > 0 else None
