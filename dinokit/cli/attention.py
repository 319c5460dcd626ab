"""The ``dinokit`` commands: attention."""

from __future__ import annotations

from pathlib import Path

import typer

from dinokit.cli._common import _fail, _progress, app, console

# ---------------------------------------------------------------- attention


@app.command("attention")
def attention_cmd(
    images: list[Path] = typer.Argument(..., help="Image files, or folders (each image in them; with "
                                        "--video-gif a folder of video frames becomes one GIF)."),
    model: str = typer.Option(..., "--model", "-m",
                              help="A ViT model: registry name (dino_vits8), folder, file or HF repo id."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder; one subfolder per image."),
    image_size: int = typer.Option(480, "--image-size", help="Resize the short side to this many pixels."),
    threshold: float = typer.Option(0.6, "--threshold", help="Share of the attention mass each mask keeps."),
    video_gif: bool = typer.Option(False, "--video-gif", help="Turn each folder argument (video frames, "
                                   "sorted by name) into OUT/<folder>.gif of the mean attention overlay."),
    head: int | None = typer.Option(None, "--head", help="With --video-gif: show this head (default: mean)."),
    fps: float = typer.Option(10.0, "--fps", help="With --video-gif: frames per second."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda (default: cpu)."),
) -> None:
    """Write DINO's last-block CLS attention maps of each image.

    Per image, in OUT/<image name>/: img.png (the resized input), attn-head{j}.png (one heatmap per head), attn-mean.png, mask_th{threshold}_head{j}.png (patches holding THRESHOLD of the mass), overlay.png (mean map on the image) and overlay-head{j}.png. A model without attention (ResNet) is an error.

    Example: dinokit attention cat.jpg --model dino_vits8 --out attn/ --image-size 480
    """
    from dinokit.attention import NoAttentionError, attention_maps, frames_gif, save_attention
    from dinokit.data.images import ImageError, list_images
    from dinokit.hub import load

    try:
        net = load(model)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if device:
        net = net.to(device)
    try:
        from dinokit.attention import _vit

        _vit(net)  # a ResNet fails here, before any work
    except NoAttentionError as exc:
        _fail(str(exc))
    files: list[Path] = []
    folders: list[Path] = []
    for item in images:
        if item.is_dir() and video_gif:
            folders.append(item)
        elif item.is_dir():
            files.extend(list_images(item))
        elif item.is_file():
            files.append(item)
        else:
            _fail(f"{item}: no such file or folder")
    used: set[str] = set()

    def unique(name: str) -> str:
        base, i = name, 1
        while name in used:
            i += 1
            name = f"{base}-{i}"
        used.add(name)
        return name

    try:
        if files:
            bar, update = _progress("attention maps")
            with bar:
                for i, f in enumerate(files):
                    maps = attention_maps(net, f, image_size=image_size, threshold=threshold)
                    save_attention(maps, out_dir / unique(f.stem))
                    update(i + 1, len(files))
        for folder in folders:
            bar, update = _progress(f"frames of {folder}")
            with bar:
                gif = frames_gif(net, folder, out_dir / f"{unique(folder.resolve().name)}.gif",
                                 image_size=image_size, head=head, fps=fps, progress=update)
            console.print(f"GIF -> {gif}", highlight=False)
    except (ImageError, NoAttentionError, ValueError) as exc:
        _fail(str(exc))
    if files:
        console.print(f"attention maps of {len(files)} image(s) -> {out_dir}", highlight=False)


