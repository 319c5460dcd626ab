"""The ``dinokit`` commands: pca (PCA pictures of patch features)."""

from __future__ import annotations

from pathlib import Path

import typer

from dinokit.cli._common import _print_json, app, console, image_files


@app.command("pca")
def pca_cmd(
    images: list[Path] = typer.Argument(..., help="Image files or folders (each image in them)."),
    model: str = typer.Option(..., "--model", "-m", help="A ViT model: registry name, folder, file or HF repo id."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder: <image>_pca.png and <image>_figure.png."),
    image_size: int = typer.Option(448, "--image-size", help="Resize the short side to this many pixels."),
    threshold: float = typer.Option(0.5, "--threshold", help="Foreground: scaled first component above this."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda (default: cpu)."),
    as_json: bool = typer.Option(False, "--json", help="Print the written files as JSON."),
) -> None:
    """Write the PCA picture of each image's patch features, and a figure with the image, the mean
    CLS attention and the PCA side by side.

    Foreground patches are those whose first principal component (scaled to [0, 1]) exceeds
    --threshold; their colours are the first three components of a PCA of the foreground alone.

    Example: dinokit pca dog.jpg --model dinov2_vits14_reg --out pca/
    """
    from dinokit.devices import resolve_device
    from dinokit.hub import load
    from dinokit.pca import pca_picture, save_pca

    files = image_files(images)
    net = load(model)
    dev = resolve_device(device) if device else None
    if dev is not None:
        net = net.to(dev)
    written: list[dict[str, object]] = []
    for f in files:
        pic = pca_picture(net, f, image_size=image_size, threshold=threshold, device=dev)
        paths = save_pca(pic, out_dir, f.stem, title=f"{f.name} - {model}")
        written.append({"image": str(f), "pca": str(paths[0]), "figure": str(paths[1]),
                        "foreground_patches": int(pic.foreground.sum())})
        if not as_json:
            console.print(f"{f} -> {paths[1]}", highlight=False)
    if as_json:
        _print_json(written)
