"""Shared pieces of the command line: the typer app, consoles, logging, errors, options, JSON, bars.

Every command module imports the app from here and registers itself on it. Errors are handled in
one place (:class:`_DinokitGroup`): a command lets dinokit's one-line errors propagate, and the user
sees one red line and exit code 1 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperGroup

console = Console(stderr=True)  # bars, logs, messages
out = Console()  # results (tables) and JSON; nothing else goes to stdout

# Errors a bad file, a bad argument or a missing resource can cause: shown as one line, exit 1.
# (ValueError covers dinokit's ConfigError, CheckpointError, ImageError, DeviceError, ...)
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, LookupError, ArithmeticError,
                                                 NotImplementedError)


class _State:
    debug = False


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message, without the quotes KeyError adds."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class _DinokitGroup(TyperGroup):
    """The top-level command group: turns exceptions into one red line (tracebacks with --debug)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:
            # typer/click's own exits and usage errors (typer >= 0.2x vendors click) pass through
            if _State.debug or type(exc).__module__.startswith(("typer", "click")):
                raise
            message = _one_line(exc)
            if not isinstance(exc, _USER_ERRORS):  # a bug, not bad input: say what it was
                message = f"{type(exc).__name__}: {message} (run with --debug for the traceback)"
            console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="dinokit",
    cls=_DinokitGroup,
    help="DINO self-supervised vision models: train, publish, embed, evaluate, search, attention maps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def setup_logging(verbosity: int, debug: bool) -> None:
    """WARNING by default, INFO with -v, DEBUG with -vv or --debug; rendered by rich above any bar."""
    from rich.logging import RichHandler

    level = logging.DEBUG if debug or verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False,
                          rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # faiss logs which CPU build it loads at INFO on every import: noise on a command line
    logging.getLogger("faiss.loader").setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)


@app.callback()
def _main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="Show progress messages (INFO); -vv also debug messages."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug messages."),
) -> None:
    _State.debug = debug
    setup_logging(verbose, debug)


def _fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error and exit; for argument errors found by the CLI itself."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _print_json(data: Any) -> None:
    """The result as JSON on stdout (nothing else is written to stdout when --json is given)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def emit(data: Any, as_json: bool, json_out: Path | None = None) -> None:
    """Print ``data`` as JSON when ``--json``; write it atomically to ``--json-out`` when given."""
    if json_out is not None:
        from dinokit._io import write_json

        write_json(json_out, data)
    if as_json:
        _print_json(data)


def _progress(description: str) -> Any:
    """A transient rich progress bar on stderr and the ``progress(done, total)`` callback that drives it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task(description, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """``with progress_bar("embedding") as update: api(..., progress=update)``."""
    bar, update = _progress(description)
    with bar:
        yield update


def image_files(items: list[Path]) -> list[Path]:
    """Image files given on the command line: files as they are, folders walked (recursive, sorted).

    A missing path is a one-line FileNotFoundError; no images at all is a ValueError."""
    from dinokit.data.images import list_images  # the walk: Pillow, only when a command needs it

    files: list[Path] = []
    for item in items:
        if item.is_dir():
            files.extend(list_images(item))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    if not files:
        raise ValueError("no images given")
    return files


def report_skipped(skipped: list[tuple[str, str]], what: str = "files") -> None:
    """List the inputs a command skipped, once, with their reasons (stderr)."""
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} {what}:[/]")
        for path, reason in skipped:
            console.print(f"  {path}: {reason}", highlight=False, markup=False, soft_wrap=True)


# ---------------------------------------------------------------- options shared by many commands
_MODEL_HELP = "Model: registry name (dino_vits16, see `dinokit models`), local folder or file, or HF Hub repo id."

ModelOpt = Annotated[str, typer.Option("--model", "-m", help=_MODEL_HELP)]
OptionalModelOpt = Annotated[str | None, typer.Option("--model", "-m", help=_MODEL_HELP)]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda if available).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", help="Decoding processes (default: on the CPU low-priority threads that decode the next batch, "
                      "since worker processes would fight the model's threads for the cores; on a GPU cores - 1, "
                      "at most 8).")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="Crop size (default: the model's); the resize "
                                                  "keeps DINO's 256/224 ratio.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (and nothing else).")]
JsonOutOpt = Annotated[Path | None, typer.Option("--json-out", help="Also write the result as JSON to this file.")]
