"""Shared pieces of the command line: the typer app, consoles, errors, JSON and progress bars."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(
    name="dinokit",
    help="DINO self-supervised vision models: train, publish, embed, evaluate, search, attention maps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

console = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit; used for every expected user error."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _progress(description: str) -> Any:
    """A transient rich progress bar on stderr and the ``progress(done, total)`` callback that drives it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task(description, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages to stderr.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


