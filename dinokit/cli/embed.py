"""The ``dinokit`` commands: embed (one file, or a sharded folder; one process or under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dinokit.cli._common import (
    BatchSizeOpt,
    DeviceOpt,
    ImageSizeOpt,
    JsonOpt,
    ModelOpt,
    WorkersOpt,
    _fail,
    _print_json,
    app,
    console,
    progress_bar,
    report_skipped,
)

_SRC_HELP = ("Images: a folder (recursive), one image, a path list (.txt), a CSV/parquet table with a 'path' "
             "column, or WebDataset tars (x.tar, 'shards/*.tar', 'shards/{000..099}.tar').")
_OUT_HELP = ("Output: a .npz/.npy/.safetensors/.parquet file for small jobs, or a folder of shards with "
             "manifest.json (the only form under torchrun).")


@app.command("embed")
def embed_cmd(
    images: Annotated[str, typer.Argument(help=_SRC_HELP)],
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help=_OUT_HELP)],
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    image_size: ImageSizeOpt = None,
    features: str = typer.Option("cls", "--features", help="cls, cls+avgpool, last4 (any lastN), patch or registers."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image instead of skipping it."),
    decode: str = typer.Option("cpu", "--decode", help="cpu: Pillow in the workers; device: workers read files, "
                               "the model's device decodes (nvJPEG on CUDA)."),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Images per shard (folder output)."),
    fmt: str = typer.Option("parquet", "--format", help="Shard files (folder output): parquet or npy."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed job in --out: keep the shards whose "
                                "checksums verify, redo the others."),
    follow_links: bool = typer.Option(False, "--follow-links", help="Walk into links that lead outside the input "
                                      "folder (default: skipped and reported; a link loop is visited once either way)."),
    precision: str = typer.Option("auto", "--precision", help="auto: bf16 autocast on CUDA and on CPUs with native "
                                  "bf16 (AVX512-BF16/AMX, about 2x fp32 there), fp32 elsewhere; or fp32, bf16."),
    runtime: str = typer.Option("torch", "--runtime", help="torch, or onnx: onnxruntime on the CPU in fp32, the model "
                                "exported once to $DINOKIT_CACHE/onnx (cls, cls+avgpool, lastN, patch, registers). "
                                "Pick onnx where it measures faster than torch (AVX2-only CPUs: ~1.26x torch fp32); "
                                "on bf16 CPUs torch bf16 is faster; features match torch fp32 (cosine >= 0.9999)."),
    as_json: JsonOpt = False,
) -> None:
    """Embed images with a DINO model and write the features.

    Examples: dinokit embed photos/ --model dino_vits16 --out photos.npz;
    torchrun --nproc_per_node 8 -m dinokit.cli embed 'shards/{0000..0999}.tar' --model dino_vits16 --out feats/
    """
    import logging

    from dinokit import distributed
    from dinokit.data.images import ImageError
    from dinokit.embedding import FILE_SUFFIXES, EmbedOptions
    from dinokit.hub import load

    logging.getLogger("dinokit.embedding.choice").setLevel(logging.INFO)  # announce runtime and precision

    to_file = out.suffix.lower() in FILE_SUFFIXES
    if to_file and distributed.init_from_env():
        distributed.shutdown()
        _fail(f"{out}: under torchrun --out must be a folder (shards + manifest.json)")
    try:
        opts = EmbedOptions(batch_size=batch_size, device=device, num_workers=workers, image_size=image_size,
                            features=features, strict=strict, decode=decode, follow_links=follow_links,
                            precision=precision, runtime=runtime)
        net = load(model)
        summary = _to_file(net, images, out, opts) if to_file else _to_folder(
            net, images, out, opts, shard_size, fmt, resume)
    except ImageError as exc:
        _fail(f"{exc} (--strict)")
    except ImportError as exc:  # --runtime onnx without onnxruntime
        _fail(str(exc))
    finally:
        distributed.shutdown()
    if summary is not None and as_json:
        _print_json(summary)


def _to_file(net: Any, images: str, out: Path, opts: Any) -> dict[str, Any]:
    from dinokit.embedding import embed

    with progress_bar("embedding") as update:
        result = embed(net, images, opts, progress=update)
    result.save(out)
    shape = "x".join(str(s) for s in result.features.shape[1:])
    console.print(f"embedded {len(result)} images ({shape} {opts.features} features) -> {out}", highlight=False)
    report_skipped(result.skipped, "unreadable files")
    return {"out": str(out), "rows": len(result), "skipped": [list(s) for s in result.skipped]}


def _to_folder(net: Any, images: str, out: Path, opts: Any, shard_size: int, fmt: str,
               resume: bool) -> dict[str, Any] | None:
    """Sharded output: every rank runs this; only rank 0 draws the bar and prints."""
    from dinokit import distributed
    from dinokit.embedding import embed_to_folder

    distributed.init_from_env()
    main = distributed.is_main_process()
    if main:
        with progress_bar("embedding") as update:
            manifest = embed_to_folder(net, images, out, opts, shard_size=shard_size, format=fmt, resume=resume,
                                       progress=update)
    else:
        manifest = embed_to_folder(net, images, out, opts, shard_size=shard_size, format=fmt, resume=resume)
    if not main:
        return None
    shape = "x".join(str(s) for s in manifest["feature_shape"])
    skipped = [(s["path"], s["reason"]) for s in manifest["skipped"]]
    console.print(f"embedded {manifest['rows']} images ({shape} {opts.features} features) into "
                  f"{len(manifest['shards'])} shards with {manifest['world_size']} process(es) -> {out}",
                  highlight=False)
    report_skipped(skipped, "unreadable files")
    return {"out": str(out), "rows": manifest["rows"], "shards": len(manifest["shards"]),
            "world_size": manifest["world_size"], "skipped": [list(s) for s in skipped]}
