"""The ``dinokit`` commands: index build/add/search/info/remove."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from dinokit.cli._common import _fail, _print_json, _progress, app, console, out

index_app = typer.Typer(help="FAISS image search: build, add to, search and inspect an index.", no_args_is_help=True)
app.add_typer(index_app, name="index")

# ---------------------------------------------------------------- retrieval: index build/add/search/info

# faiss logs which CPU build it loads at INFO on every import: noise on a command line
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

_KIND_HELP = ("Index kind: auto (flat under 20k images, HNSW up to 250k, else IVF-PQ with exact re-rank; "
              "see dinokit.retrieval.choose_kind), flat (exact), hnsw, ivfpq.")


def _parse_knobs(knobs: list[str] | None) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in knobs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--knob {item!r}: expected KEY=VALUE, e.g. --knob ef_search=128")
        try:
            parsed[key] = int(value)
        except ValueError:
            try:
                parsed[key] = float(value)
            except ValueError:
                parsed[key] = value
    return parsed


def _index_model(index: Any, model_src: str | None) -> Any:
    """The model to embed with: --model, else the source recorded in the index metadata."""
    from dinokit.hub import load

    src = model_src or index.model_source
    if not src:
        _fail("the index does not record which model built it; pass --model SRC")
    try:
        return load(src)
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"cannot load model {src!r}: {exc}")


def _load_index(path: Path) -> Any:
    from dinokit.retrieval.index import Index

    try:
        return Index.load(path)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@index_app.command("build")
def index_build_cmd(
    folder: Path = typer.Argument(..., help="Folder of images, searched recursively."),
    model: str = typer.Option(..., "--model", "-m",
                              help="Model: registry name (dino_vits16), folder, file or HF repo id."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Index folder to write (replaced atomically)."),
    kind: str = typer.Option("auto", "--kind", help=_KIND_HELP),
    knob: list[str] | None = typer.Option(None, "--knob", help="Index knob KEY=VALUE, repeatable: hnsw M, "
                                          "ef_construction, ef_search; ivfpq nlist, pq_m, nprobe, "
                                          "k_factor, refine (flat|sq8)."),
    features: str = typer.Option("cls", "--features", help="Feature kind: cls, cls+avgpool, lastN."),
    image_size: int | None = typer.Option(None, "--image-size", help="Crop size (default: the model's)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: int | None = typer.Option(None, "--workers", help="Decoding processes (default: cores - 1)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
    threads: int | None = typer.Option(None, "--threads", help="FAISS threads (default: all cores)."),
) -> None:
    """Embed every image under FOLDER and write a search index.

    Example: dinokit index build photos/ --model dino_vits16 --out photos.index --kind hnsw
    """
    from dinokit.data.images import ImageError
    from dinokit.hub import load
    from dinokit.retrieval.index import Index, check_index_target, set_num_threads

    if kind not in ("auto", "flat", "hnsw", "ivfpq"):
        _fail(f"--kind {kind!r}: expected auto, flat, hnsw or ivfpq")
    try:
        check_index_target(out_dir)  # fail before the embedding work, not after
    except FileExistsError as exc:
        _fail(str(exc))
    if threads:
        set_num_threads(threads)
    knobs = _parse_knobs(knob)
    try:
        net = load(model)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    bar, update = _progress("embedding")
    try:
        with bar:
            index = Index.build(folder, model=net, kind=kind, batch_size=batch_size, device=device,
                                num_workers=workers, image_size=image_size, feature_kind=features,
                                progress=update, **knobs)
        index.save(out_dir)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ImageError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"indexed {len(index)} images ({index.kind}, dim {index.dim}) -> {out_dir}", highlight=False)


@index_app.command("add")
def index_add_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder written by `dinokit index build`."),
    items: list[Path] = typer.Argument(..., help="Folders or image files to add; paths already indexed are skipped."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model (default: the one recorded in the index)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: int | None = typer.Option(None, "--workers", help="Decoding processes (default: cores - 1)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda (default: cuda if available)."),
    threads: int | None = typer.Option(None, "--threads", help="FAISS threads (default: all cores)."),
) -> None:
    """Add new images to an index (in place).

    Example: dinokit index add photos.index photos/2024/
    """
    from dinokit.data.images import ImageError
    from dinokit.retrieval.index import set_num_threads

    if threads:
        set_num_threads(threads)
    index = _load_index(index_dir)
    net = _index_model(index, model)
    added = 0
    try:
        for item in items:
            bar, update = _progress(f"embedding {item}")
            with bar:
                added += index.add(item if item.is_dir() else [item], model=net, batch_size=batch_size,
                                   device=device, num_workers=workers, progress=update)
        index.save(index_dir)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ImageError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"added {added} images; the index holds {len(index)}", highlight=False)


@index_app.command("search")
def index_search_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder written by `dinokit index build`."),
    queries: list[Path] = typer.Argument(..., help="Query image files."),
    k: int = typer.Option(10, "-k", "--k", help="Results per query."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON on stdout."),
    sheet: Path | None = typer.Option(None, "--sheet", help="Write a contact-sheet PNG: a row per query."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model (default: the one recorded in the index)."),
    ef_search: int | None = typer.Option(None, "--ef-search", help="HNSW efSearch (default: stored knob)."),
    nprobe: int | None = typer.Option(None, "--nprobe", help="IVF-PQ lists probed (default: stored knob)."),
    threads: int | None = typer.Option(None, "--threads", help="FAISS threads (default: all cores)."),
) -> None:
    """Find the K most similar indexed images of each QUERY image (cosine similarity).

    Example: dinokit index search photos.index query.jpg -k 5 --sheet results.png
    """
    from dinokit.data.images import ImageError
    from dinokit.retrieval.index import ModelMismatchError, contact_sheet, set_num_threads

    if threads:
        set_num_threads(threads)
    index = _load_index(index_dir)
    net = _index_model(index, model)
    try:
        res = index.search([str(q) for q in queries], k=k, model=net, ef_search=ef_search, nprobe=nprobe)
    except (ModelMismatchError, ImageError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if sheet is not None:
        contact_sheet(res, [str(q) for q in queries], sheet, index=index)
        console.print(f"contact sheet -> {sheet}", highlight=False)
    if as_json:
        _print_json(res.to_list())
        return
    from rich.table import Table

    for row in res.to_list():
        table = Table(title=f"query: {row['query']}", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("path")
        for r in row["results"]:
            table.add_row(str(r["rank"]), f"{r['score']:.4f}", r["path"])
        out.print(table)


@index_app.command("info")
def index_info_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder written by `dinokit index build`."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show what an index holds: count, kind, knobs, memory, model, feature kind.

    Example: dinokit index info photos.index
    """
    info = _load_index(index_dir).info()
    if as_json:
        _print_json(info)
        return
    from rich.table import Table

    table = Table(show_header=False, title=str(index_dir), title_justify="left")
    for key, value in info.items():
        if key == "model" and isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        table.add_row(key, str(value))
    out.print(table)


@index_app.command("remove")
def index_remove_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder written by `dinokit index build`."),
    paths: list[str] = typer.Argument(..., help="Stored paths to remove (as `index search` prints them)."),
) -> None:
    """Remove images from an index (in place); unknown paths are ignored.

    Example: dinokit index remove photos.index cats/001.jpg cats/002.jpg
    """
    index = _load_index(index_dir)
    n = index.remove(paths)
    try:
        index.save(index_dir)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"removed {n} of {len(paths)} paths; the index holds {len(index)}", highlight=False)


