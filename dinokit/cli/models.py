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
    table = Table(title="DINO weights (ImageNet top-1, official)")
    for col in ("name", "arch", "dim", "k-NN", "linear", "timm hub id", "cached"):
        table.add_column(col, justify="right" if col in ("dim", "k-NN", "linear") else "left")
    for e in entries:
        table.add_row(e.name, e.arch, str(e.embed_dim), f"{e.knn_top1:.1f}", f"{e.linear_top1:.1f}",
                      e.timm_hub_id or "-", "yes" if e.cache_path().is_file() else "no")
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
