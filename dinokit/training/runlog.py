"""The files a run folder holds besides checkpoints: config.json, JSON-lines logs and summary.json.

- log_iter.jsonl: one record per ``log_every`` iterations (and at each epoch end), loss averaged over
  the window; log_epoch.jsonl: one record per epoch; log_knn.jsonl: the records epoch-end callbacks
  return (the k-NN monitor's scores); summary.json: the result of :func:`dinokit.train`.
Only rank 0 writes (``enabled``); records are appended whole, one line each.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dinokit._io import write_json
from dinokit.training.config import TrainConfig

ProgressFn = Callable[..., None]  # progress(done, total) or progress(done, total, stats)


def write_run_config(run_dir: str | os.PathLike[str], cfg: TrainConfig) -> Path:
    """Create the run folder and write config.json (the resolved recipe), atomically; returns its path."""
    path = Path(run_dir) / "config.json"
    write_json(path, cfg.to_dict())
    return path


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class RunLog:
    """Accumulates losses and timings and writes the run's JSON-lines logs and summary."""

    def __init__(self, run_dir: str | os.PathLike[str], global_batch: int, iterations_per_epoch: int,
                 log_every: int, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.global_batch, self.ipe, self.log_every, self.enabled = global_batch, iterations_per_epoch, log_every, enabled
        self.last_loss = math.nan
        self.last_record: dict[str, Any] | None = None  # the last callback record
        self.restart_epoch()

    def restart_epoch(self) -> None:
        """Start the timing window and epoch averages afresh (after an epoch end and its callbacks)."""
        now = time.perf_counter()
        self._win_t0, self._win_loss, self._win_n = now, 0.0, 0
        self._ep_t0, self._ep_loss, self._ep_n = now, 0.0, 0

    def iteration(self, rec: dict[str, Any], loss: float, elapsed_s: float) -> None:
        """Record one iteration (``rec``: TrainState.stats()); writes a window record when one is due."""
        self.last_loss = loss
        self._win_loss += loss
        self._win_n += 1
        self._ep_loss += loss
        self._ep_n += 1
        if self.enabled and (self._win_n >= self.log_every or rec["iteration"] % self.ipe == 0):
            dt = time.perf_counter() - self._win_t0
            append_jsonl(self.run_dir / "log_iter.jsonl", {
                **rec, "loss": self._win_loss / self._win_n,
                "images_per_s": self._win_n * self.global_batch / max(dt, 1e-9), "time_s": elapsed_s})
            self._win_t0, self._win_loss, self._win_n = time.perf_counter(), 0.0, 0

    def epoch_images_per_s(self) -> float:
        return self.global_batch * self._ep_n / max(time.perf_counter() - self._ep_t0, 1e-9)

    def epoch(self, rec: dict[str, Any], elapsed_s: float) -> None:
        """The epoch-end record: ``epoch`` is the number of epochs completed."""
        if not self.enabled:
            return
        ep_time = time.perf_counter() - self._ep_t0
        append_jsonl(self.run_dir / "log_epoch.jsonl", {
            **{k: v for k, v in rec.items() if k != "epoch"}, "epoch": rec["iteration"] // self.ipe,
            "loss": self._ep_loss / max(self._ep_n, 1), "images_per_s": self._ep_n * self.global_batch / max(ep_time, 1e-9),
            "epoch_time_s": ep_time, "time_s": elapsed_s})

    def callback_records(self, records: Iterable[dict[str, Any]]) -> None:
        """Append epoch-end callback records (k-NN scores) to log_knn.jsonl."""
        for rec in records:
            self.last_record = rec
            if self.enabled:
                append_jsonl(self.run_dir / "log_knn.jsonl", rec)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            write_json(self.run_dir / "summary.json", summary)


def progress_reporter(progress: ProgressFn | None, log: RunLog) -> Callable[[int, int, dict[str, Any]], None]:
    """Adapt ``progress(done, total)`` or ``progress(done, total, stats)`` to one call shape (None: no-op)."""
    if progress is None:
        return lambda done, total, rec: None
    if not _wants_stats(progress):
        return lambda done, total, rec: progress(done, total)

    def report(done: int, total: int, rec: dict[str, Any]) -> None:
        progress(done, total, {**rec, "loss": log.last_loss, "images_per_s": log.epoch_images_per_s()})

    return report


def _wants_stats(progress: ProgressFn) -> bool:
    try:
        params = inspect.signature(progress).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
