"""The ``dinokit`` commands: train."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from dinokit.cli._common import _fail, _print_json, app, console

# ---------------------------------------------------------------- training: train


@app.command("train")
def train_cmd(
    recipe: Path = typer.Argument(None, help="Training recipe (YAML/JSON). Optional with --resume (uses RUN_DIR/config.json)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set optim.lr=0.001 (repeatable)."),
    out_dir: Path = typer.Option(None, "--out", help="Run folder (default: runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint.pth."),
    init: str = typer.Option(None, "--init", help="Start from a full checkpoint (heads included) or any dinokit.load source."),
) -> None:
    """Train a DINO model (multi-crop, EMA teacher, centering + sharpening); torchrun for several GPUs.

    The run folder gets config.json (the resolved recipe), checkpoint.pth (atomic, every checkpoint_every epochs and at the end), log_iter.jsonl, log_epoch.jsonl, log_knn.jsonl and summary.json, also printed as JSON at the end. A misspelled key is an error naming it.

    Example: dinokit train recipes/fashion_mnist_cpu.yaml --set max_minutes=5 --out runs/fmnist

    Several GPUs: torchrun --nproc_per_node 8 -m dinokit.cli train recipes/dino_vits16_in1k.yaml --out runs/v
    """
    from dinokit.training.config import ConfigError, load_config

    if recipe is None and not resume:
        _fail("give a RECIPE.yaml (or --resume with --out RUN_DIR)")
    if out_dir is None:
        if recipe is None:
            _fail("--resume without a recipe needs --out RUN_DIR")
        out_dir = Path("runs") / recipe.stem
    try:
        if recipe is None:
            cfg_file = out_dir / "config.json"
            if not cfg_file.is_file():
                _fail(f"{cfg_file}: no config to resume from")
            cfg = load_config(cfg_file, list(set_))
        else:
            cfg = load_config(recipe, list(set_))
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from dinokit import distributed
    from dinokit.eval.monitor import KNNMonitor
    from dinokit.training import loop

    # the automatic precision choice (and its short timing probe) is announced on screen
    logging.getLogger("dinokit.training.precision").setLevel(logging.INFO)
    callbacks = [KNNMonitor.from_config(cfg)] if cfg.knn.train_source else []

    bar = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    task = bar.add_task("train", total=None, stats="")

    def update(done: int, total: int, stats: dict[str, Any]) -> None:
        text = (f"ep {stats['epoch']} loss {stats['loss']:.4f} lr {stats['lr']:.2e} "
                f"tt {stats['teacher_temp']:.3f} {stats['images_per_s']:.0f} img/s")
        bar.update(task, completed=done, total=total, stats=text)

    try:
        with bar if distributed.local_rank() == 0 else _nullctx():
            summary = loop.train(cfg, out_dir, resume=resume, init=init, progress=update, callbacks=callbacks)
    except loop.TrainingDiverged as e:
        _fail(str(e))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e).splitlines()[0])
    if distributed.is_main_process():
        _print_json(summary)
    distributed.shutdown()


def _nullctx() -> Any:
    from contextlib import nullcontext

    return nullcontext()



