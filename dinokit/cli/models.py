"""The ``dinokit`` commands: models and convert."""

from __future__ import annotations

from pathlib import Path

import typer

from dinokit.cli._common import JsonOpt, _fail, _print_json, app, console, out


@app.command("models")
def models_cmd(as_json: JsonOpt = False) -> None:
    """List the known DINO weights (registry names usable as --model / dinokit.load).

    Example: dinokit models --json
    """
    from rich.table import Table

    from dinokit.models.registry import list_models

    entries = list_models()
    if as_json:
        _print_json([{**e.to_dict(), "cached": e.cache_path().is_file()} for e in entries])
        return
    table = Table(title="DINO weights (ImageNet top-1, official; - where none is published)")
    # arch, URLs and hub ids are in --json; the table keeps what fits a terminal
    for col in ("name", "family", "params", "dim", "input", "k-NN", "linear", "cached"):
        table.add_column(col, justify="right" if col in ("params", "dim", "k-NN", "linear") else "left",
                         no_wrap=col == "name")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for e in entries:
        table.add_row(e.name, e.family, f"{e.params_m:g}M" if e.params_m else "-", str(e.embed_dim),
                      f"{e.input_size[1]}x{e.input_size[2]}", pct(e.knn_top1), pct(e.linear_top1),
                      "yes" if e.cache_path().is_file() else ("gated" if e.gated else "no"))
    out.print(table)


@app.command("convert")
def convert_cmd(
    source: str = typer.Argument(..., help="Registry name, checkpoint file, folder or HF Hub repo id."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write (timm layout: config.json, "
                                 "model.safetensors, README.md)."),
    which: str = typer.Option("teacher", "--which", help="teacher or student (full training checkpoints)."),
    name: str | None = typer.Option(None, "--name", help="Model name in the card (default: folder name)."),
    as_json: JsonOpt = False,
) -> None:
    """Convert any DINO checkpoint into a timm-compatible folder.

    Example: dinokit convert dino_deitsmall16_pretrain.pth --out dino-vits16/
    """
    from dinokit.hub import load, save
    from dinokit.models.backbone import identity

    if which not in ("teacher", "student"):
        _fail(f"--which {which!r}: expected teacher or student")
    model = load(source, which=which)
    folder = save(model, out_dir, name=name)
    ident = identity(model)
    if as_json:
        _print_json({"source": source, "folder": str(folder), **ident})
        return
    console.print(f"{source} -> {folder} ({ident['arch']}, {ident['num_features']}-d features, "
                  f"fingerprint {ident['fingerprint']})", highlight=False)
