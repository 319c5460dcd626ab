"""The ``dinokit`` command line: a thin typer layer over the Python API.

Commands parse options, call the API and render results (rich tables, progress bars, JSON).
No logic that a Python user would also want lives here. One module per command group; importing
them registers their commands on the shared app.
"""

from __future__ import annotations

import importlib

from dinokit.cli._common import app

# in the order `dinokit --help` lists them
_GROUPS = ("models", "embed", "train", "evaluate", "index", "serve", "attention", "pictures", "onnx", "publish")
for _group in _GROUPS:
    importlib.import_module(f"dinokit.cli.{_group}")


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
