"""``dinokit.train(config, out_dir)``: the wiring of a DINO run, from a laptop CPU to torchrun on many GPUs.

The parts live beside it: :mod:`.state` (TrainState and the per-iteration ``step``), :mod:`.checkpoint`
(Checkpointer), :mod:`.runlog` (RunLog), :mod:`.stop` (StopPolicy, Clock), :mod:`.precision` and
:mod:`.callbacks`. Every iteration's randomness is seeded from (seed, epoch, iteration), so
``resume=True`` continues a stopped run exactly.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from dinokit import distributed
from dinokit.devices import resolve_device
from dinokit.training.callbacks import Callbacks, EpochCallback
from dinokit.training.checkpoint import Checkpointer
from dinokit.training.config import TrainConfig, load_config, require_source
from dinokit.training.data import TrainData, build_train_data
from dinokit.training.models import build_models, load_init, place_models
from dinokit.training.precision import choose_precision, probe_views
from dinokit.training.runlog import ProgressFn, RunLog, progress_reporter, write_run_config
from dinokit.training.state import TrainingDiverged, TrainState, step
from dinokit.training.stop import Clock, StopPolicy

__all__ = ["TrainingDiverged", "build_models", "train"]

log = logging.getLogger(__name__)


def train(config: TrainConfig | str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
          resume: bool = False, init: str | None = None, progress: ProgressFn | None = None,
          callbacks: Sequence[EpochCallback] = ()) -> dict[str, Any]:
    """Train a DINO model; write checkpoints and JSON-lines logs to ``out_dir``; return the summary.

    ``config``: a TrainConfig, a recipe path, or None with ``resume=True`` (the run's config.json).
    ``resume``: continue from ``out_dir/checkpoint.pth`` (exactly where it stopped).
    ``init``: start from an official/dinokit full checkpoint (student, teacher, heads) or any
    ``dinokit.load`` source (backbone only). ``progress(done, total)`` or
    ``progress(done, total, stats)`` is called after every iteration on rank 0 (stats: loss, lr,
    wd, teacher_temp, momentum, images_per_s, epoch). ``callbacks``: epoch-end functions of the
    teacher backbone whose records go to log_knn.jsonl, e.g. ``[KNNMonitor.from_config(cfg)]``
    (:mod:`dinokit.eval.monitor`). Raises TrainingDiverged on a NaN/inf loss (the last checkpoint is kept).
    """
    run_dir = Path(out_dir)
    cfg = _resolve_config(config, run_dir)
    distributed.init_from_env()
    rank, main = distributed.get_rank(), distributed.is_main_process()
    device = resolve_device(cfg.device, distributed.local_rank())
    if cfg.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    ckpt = Checkpointer(run_dir, cfg, enabled=main)
    saved = ckpt.open(resume)
    if main:  # the run folder exists before anything slow happens
        write_run_config(run_dir, cfg)
        _warn_unused_knn(cfg, callbacks)
    state, data = _build(cfg, device, rank, None if saved else init)
    clock = Clock(ckpt.restore(state, saved) if saved else 0.0)  # from here on, time counts in max_minutes
    start = state.iteration
    if saved:
        state.prepare(str(saved.get("precision", "fp32")), saved.get("fp16_scaler"))
    else:
        state.prepare(_initial_precision(state, main))
    log.info("training %s on %s: %d images, %d iterations/epoch x %d epochs, total batch %d, %d crops, %s",
             cfg.model.arch, device, data.num_samples, state.iterations_per_epoch, cfg.optim.epochs,
             data.global_batch, 2 + cfg.data.local_crops_number, state.precision)
    run_log = RunLog(run_dir, data.global_batch, state.iterations_per_epoch, cfg.log_every, enabled=main)
    hooks = Callbacks(callbacks if main else (), compiled=cfg.compile)
    t_loop = time.perf_counter()
    # closing: a stopped run's data loader workers end here, not at interpreter exit
    with closing(_batches(data, start, state.total_iterations)) as batches:
        try:
            stopped = _iterate(state, batches, ckpt, run_log, hooks, StopPolicy.from_config(cfg, device),
                               clock, progress_reporter(progress if main else None, run_log))
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}. Last good checkpoint: {ckpt.last_good()}") from None
    if start >= state.total_iterations:
        log.info("%s: training already complete (%d iterations)", ckpt.path, state.total_iterations)
    it, elapsed = state.iteration, clock.elapsed()  # training time: the final callbacks are not part of it
    run_log.callback_records(hooks.at_end(state.teacher.backbone, it // state.iterations_per_epoch, it, elapsed))
    summary = {
        "run_dir": str(run_dir), "checkpoint": str(ckpt.path), "epochs_completed": it // state.iterations_per_epoch,
        "iterations": it, "iterations_per_epoch": state.iterations_per_epoch,
        "final_loss": run_log.last_loss if math.isfinite(run_log.last_loss) else None, "stopped": stopped,
        "precision": state.precision, "device": str(device), "world_size": distributed.get_world_size(),
        "images_per_s": (it - start) * data.global_batch / max(time.perf_counter() - t_loop, 1e-9),
        "train_time_s": elapsed, "knn": run_log.last_record,
    }
    run_log.summary(summary)
    distributed.barrier()
    return summary


def _resolve_config(config: TrainConfig | str | os.PathLike[str] | None, run_dir: Path) -> TrainConfig:
    """A TrainConfig from a config, a recipe path or (None) the run folder's config.json; needs data.source."""
    if config is None:
        path = run_dir / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config given and none in the run folder")
        config = TrainConfig.from_json(path.read_text(), str(path))
    elif not isinstance(config, TrainConfig):
        config = load_config(Path(config))
    require_source(config)
    return config


def _warn_unused_knn(cfg: TrainConfig, callbacks: Sequence[EpochCallback]) -> None:
    if cfg.knn.train_source and not callbacks:
        log.warning("knn.train_source is set but no k-NN callback was passed, so no k-NN is measured; pass "
                    "callbacks=[dinokit.eval.monitor.KNNMonitor.from_config(cfg)] to dinokit.train "
                    "(`dinokit train` does this)")


def _build(cfg: TrainConfig, device: torch.device, rank: int, init: str | None) -> tuple[TrainState, TrainData]:
    """Networks (seeded, optionally initialised, placed), this rank's data and the state at iteration 0."""
    torch.manual_seed(cfg.seed)
    student, teacher = build_models(cfg)
    if init is not None:
        log.info("initialised from %s (%s)", init, load_init(student, teacher, init))
    world = distributed.get_world_size()
    channels_last = place_models(student, teacher, cfg, device, world)
    data = build_train_data(cfg, device, rank, world, channels_last)
    state = TrainState.create(cfg, device, student, teacher, data.iterations_per_epoch, data.global_batch, rank,
                              channels_last)
    return state, data


def _initial_precision(state: TrainState, main: bool) -> str:
    """Rank 0 chooses (a probe on "auto" CPUs with native bf16, before data loading starts); all ranks use it."""
    cfg, choice = state.cfg, "fp32"
    if main or cfg.precision != "auto":
        views = probe_views(cfg, state.device, state.channels_last) if cfg.precision == "auto" else None
        choice = choose_precision(cfg, state.device, state.student, state.teacher, views)
    return str(distributed.broadcast_object(choice))


def _batches(data: TrainData, start: int, total: int) -> Generator[list[torch.Tensor], None, None]:
    if start < total:  # a finished run starts no data loader workers
        yield from data.batches(start, total)


def _iterate(state: TrainState, batches: Iterator[list[torch.Tensor]], ckpt: Checkpointer, run_log: RunLog,
             hooks: Callbacks, stop: StopPolicy, clock: Clock,
             report: Callable[[int, int, dict[str, Any]], None]) -> str | None:
    """Steps until the data ends or a limit is reached (then a checkpoint); returns the stop reason or None."""
    ipe, total = state.iterations_per_epoch, state.total_iterations
    for crops in batches:
        loss = step(state, crops)
        it, elapsed, rec = state.iteration, clock.elapsed(), state.stats()
        run_log.iteration(rec, loss, elapsed)
        report(it, total, rec)
        if it % ipe == 0:
            _end_epoch(state, ckpt, run_log, hooks, elapsed)
        reason = stop.reason(it, elapsed)
        if reason is not None and it < total:
            log.info("stopping at iteration %d (%s)", it, reason)
            if ckpt.last_saved != it:
                ckpt.save(state, elapsed)
            return reason
    return None


def _end_epoch(state: TrainState, ckpt: Checkpointer, run_log: RunLog, hooks: Callbacks, elapsed: float) -> None:
    """Epoch record, checkpoint when due (always at the end), callbacks when due (not at the end)."""
    it, total = state.iteration, state.total_iterations
    epochs_done = it // state.iterations_per_epoch
    run_log.epoch(state.stats(), elapsed)
    if epochs_done % state.cfg.checkpoint_every == 0 or it == total:
        ckpt.save(state, elapsed)
    if it < total:
        run_log.callback_records(hooks.at_epoch_end(state.teacher.backbone, epochs_done, it, elapsed))
    distributed.barrier()
    run_log.restart_epoch()
