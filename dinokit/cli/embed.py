"""The ``dinokit`` commands: embed."""

from __future__ import annotations

from pathlib import Path

import typer

from dinokit.cli._common import _fail, _progress, app, console


@app.command("embed")
def embed_cmd(
    images: Path = typer.Argument(..., help="Folder of images (searched recursively) or one image file."),
    model: str = typer.Option(..., "--model", "-m",
                              help="Model: registry name (dino_vits16), folder, file or HF repo id."),
    out_file: Path = typer.Option(..., "--out", "-o", help="Output: .npz (features + paths), .npy or .safetensors."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
    workers: int | None = typer.Option(None, "--workers", help="Decoding processes (default: cores - 1)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Crop size (default: the model's, 224); "
                                          "the resize keeps DINO's 256/224 ratio."),
    features: str = typer.Option("cls", "--features", help="cls, cls+avgpool, last4 (any lastN), patch or registers."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image instead of skipping it."),
) -> None:
    """Embed every image under IMAGES with a DINO model and write the features.

    Example: dinokit embed photos/ --model dino_vits16 --out photos.npz
    """
    from dinokit.data.images import ImageError
    from dinokit.embedding import embed
    from dinokit.hub import load

    if out_file.suffix.lower() not in (".npz", ".npy", ".safetensors"):
        _fail(f"{out_file}: unknown output type; use .npz, .npy or .safetensors")
    try:
        net = load(model)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    bar, update = _progress("embedding")
    try:
        with bar:
            result = embed(net, images, batch_size=batch_size, device=device, num_workers=workers,
                           image_size=image_size, features=features, strict=strict, progress=update)
        result.save(out_file)
    except ImageError as exc:
        _fail(f"{exc} (--strict)")
    except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as exc:
        _fail(str(exc))
    shape = "x".join(str(s) for s in result.features.shape[1:])
    console.print(f"embedded {len(result)} images ({shape} {features} features) -> {out_file}", highlight=False)
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} unreadable files:[/]")
        for path, reason in result.skipped:
            console.print(f"  {path}: {reason}", highlight=False, markup=False)



