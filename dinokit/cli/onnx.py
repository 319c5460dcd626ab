"""The ``dinokit`` commands: export-onnx."""

from __future__ import annotations

from pathlib import Path

import typer

from dinokit.cli._common import _print_json, app, console


@app.command("export-onnx")
def export_onnx_cmd(
    source: str = typer.Argument(..., help="Registry name, checkpoint file, folder or HF Hub repo id."),
    out_file: Path = typer.Option(..., "--out", "-o", help="The .onnx file to write."),
    features: str = typer.Option("cls", "--features", help="cls (B, D), cls+avgpool (B, 2D), lastN (B, N*D), "
                                 "patch (B, P, D) or registers (B, R, D)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Example input size (default: the "
                                          "model's input size)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime with torch."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a DINO backbone to ONNX (batch always dynamic; image size dynamic where the graph
    stays exact) and check it with onnxruntime against torch.

    Example: dinokit export-onnx dinov2_vits14_reg --out dinov2.onnx --features patch
    """
    from dinokit.hub import load
    from dinokit.onnx import export_onnx

    result = export_onnx(load(source), out_file, features=features, image_size=image_size, check=check)
    info = {"path": str(result.path), "features": result.features, "dynamic_size": result.dynamic_size,
            "checked_sizes": [list(s) for s in result.checked_sizes], "max_abs_diff": result.max_abs_diff}
    if as_json:
        _print_json(info)
        return
    if result.dynamic_size:
        size = "any image size"
    else:
        size = "fixed image size" + ("" if not result.checked_sizes else " {}x{}".format(*result.checked_sizes[0]))
    diff = "" if result.max_abs_diff is None else f", onnxruntime vs torch max abs diff {result.max_abs_diff:.2g}"
    console.print(f"{source} -> {result.path} ({features} features, dynamic batch, {size}{diff})", highlight=False)
