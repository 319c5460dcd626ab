"""The ``dinokit`` command line: a thin typer layer over the Python API.

Commands parse options, call the API and render results (rich tables, progress bars, JSON).
No logic that a Python user would also want lives here.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
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
index_app = typer.Typer(help="FAISS image search: build, add to, search and inspect an index.", no_args_is_help=True)
app.add_typer(index_app, name="index")

console = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit; used for every expected user error."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages to stderr.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


# ---------------------------------------------------------------- foundation: models, convert, embed


# ---------------------------------------------------------------- training: train


# ---------------------------------------------------------------- evaluation: knn-eval, linear-eval, classify


# ---------------------------------------------------------------- retrieval: index build/add/search/info


# ---------------------------------------------------------------- attention


# ---------------------------------------------------------------- publishing: export, push, plot


@app.command("push")
def push_cmd(
    folder: Path = typer.Argument(..., help="An exported model folder (config.json + model.safetensors)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub model repo, org/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to push to (created from main)."),
    token: str | None = typer.Option(None, "--token", help="Hub token; default HF_TOKEN or the saved login."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
) -> None:
    """Upload an exported model folder to the Hugging Face Hub and print the commit URL."""
    from dinokit.publish import PushError, push

    try:
        url = push(folder, repo_id, private=private, revision=revision, token=token, commit_message=message)
    except (FileNotFoundError, ValueError, PushError) as exc:
        _fail(str(exc))
    out.print(url, highlight=False, soft_wrap=True)


@app.command("plot")
def plot_cmd(
    run_dir: Path = typer.Argument(..., help="A training run folder (log_iter.jsonl, log_knn.jsonl)."),
    out_png: Path | None = typer.Option(None, "--out", "-o", help="PNG to write [default: RUN_DIR/curves.png]."),
    x: str = typer.Option("iteration", "--x", help="x axis: iteration or minutes."),
) -> None:
    """Draw loss, learning rate, teacher temperature and k-NN curves of a run to PNG."""
    from dinokit.train.plot import plot_run

    try:
        path = plot_run(run_dir, out_png, x=x)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    out.print(str(path), highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
