"""The ``dinokit index`` commands: build, add, search, info, remove, compact, migrate."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer

from dinokit.cli._common import (
    WorkersOpt,
    _fail,
    _print_json,
    _progress,
    app,
    console,
    out,
    progress_bar,
    report_skipped,
)

index_app = typer.Typer(help="FAISS image search: build, add to, search, filter and inspect an index.",
                        no_args_is_help=True)
app.add_typer(index_app, name="index")

# ---------------------------------------------------------------- retrieval: index build/add/search/info

# faiss logs which CPU build it loads at INFO on every import: noise on a command line
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

_KIND_HELP = ("Index kind: auto (flat under 20k images, HNSW up to 250k, else IVF-PQ with exact re-rank "
              "from RAM, 8-bit codes or the vector file on disk, whichever fits --memory-budget; "
              "see dinokit.retrieval.kinds.choose_kind), flat (exact), hnsw, ivfpq.")


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
    return load(src)


def _load_index(path: Path, read_only: bool = False) -> Any:
    from dinokit.retrieval.index import Index

    return Index.load(path, read_only=read_only)


def _parse_filter(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        flt = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--filter {text!r}: not JSON ({e.msg})") from e
    if not isinstance(flt, dict):
        _fail(f"--filter {text!r}: expected a JSON object of field: value")
    return flt


_MODEL_HELP = "Model: registry name (dino_vits16), folder, file or HF repo id."
_METADATA_HELP = ("Per-image metadata: a CSV, JSON-lines or parquet file with a 'path' column (paths as "
                  "stored, as given, or absolute); the other columns become filterable fields.")


_BUDGET_HELP = ("Memory the index may use, with a unit: 512MB, 4GB (binary units). kind=auto picks the "
                "largest in-RAM layout that fits (see docs/scale.md); a build from --features holds that "
                "index plus one shard, a training sample and a 100k-row chunk.")


def _parse_shards(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit() or int(start) >= int(stop):
        _fail(f"--shards {text!r}: expected START:STOP shard numbers (STOP excluded), e.g. --shards 0:10")
    return int(start), int(stop)


@index_app.command("build")
def index_build_cmd(
    folder: Path | None = typer.Argument(None, help="Folder of images, searched recursively (or give "
                                         "--features DIR to index a feature folder instead)."),
    model: str | None = typer.Option(None, "--model", "-m", help=_MODEL_HELP + " Required with FOLDER; with a "
                                     "feature folder, how to load the model for image queries (default: "
                                     "the model its manifest names)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Index folder to write (replaced atomically)."),
    kind: str = typer.Option("auto", "--kind", help=_KIND_HELP),
    knob: list[str] | None = typer.Option(None, "--knob", help="Index knob KEY=VALUE, repeatable: hnsw M, "
                                          "ef_construction, ef_search; ivfpq nlist, pq_m, nprobe, "
                                          "k_factor, refine (flat|sq8|disk), ondisk (0|1)."),
    metadata: Path | None = typer.Option(None, "--metadata", help=_METADATA_HELP),
    features: str = typer.Option("cls", "--features", help="With FOLDER: the feature kind (cls, cls+avgpool, "
                                 "lastN). Without FOLDER: a sharded feature folder written by `dinokit embed "
                                 "--out DIR`, indexed shard by shard without embedding (ids = row numbers)."),
    memory_budget: str = typer.Option("8GB", "--memory-budget", help=_BUDGET_HELP),
    shards: str | None = typer.Option(None, "--shards", help="With --features DIR: index only shards "
                                      "START:STOP (STOP excluded), e.g. one machine's share; join the parts "
                                      "with `dinokit index merge`."),
    trained_from: Path | None = typer.Option(None, "--trained-from", help="With --features DIR: reuse the "
                                             "trained quantizers of this IVF-PQ index (same knobs) instead of "
                                             "training, so that `index merge` joins the parts without re-encoding."),
    image_size: int | None = typer.Option(None, "--image-size", help="Crop size (default: the model's)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: WorkersOpt = None,
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
    threads: int | None = typer.Option(None, "--threads", help="FAISS threads (default: all cores)."),
    follow_links: bool = typer.Option(False, "--follow-links", help="Walk into links that lead outside FOLDER "
                                      "(default: skipped and reported; a link loop is visited once either way)."),
    as_json: bool = typer.Option(False, "--json", help="Print the index's info as JSON on stdout."),
) -> None:
    """Embed every image under FOLDER and write a search index, or index a sharded feature folder.

    Examples: dinokit index build photos/ --model dino_vits16 --out photos.index --metadata products.csv

    dinokit index build --features feats/ --out big.index --memory-budget 4GB
    """
    from dinokit.retrieval.folder import check_index_target
    from dinokit.retrieval.index import Index
    from dinokit.retrieval.kinds import set_num_threads
    from dinokit.retrieval.metadata import read_metadata_file
    from dinokit.retrieval.stream import parse_size

    if kind not in ("auto", "flat", "hnsw", "ivfpq"):
        _fail(f"--kind {kind!r}: expected auto, flat, hnsw or ivfpq")
    try:
        budget = parse_size(memory_budget)
    except ValueError as e:
        _fail(f"--memory-budget: {e}")
    from_features = folder is None
    if not from_features and Path(features).is_dir():
        _fail(f"give either FOLDER (images to embed) or --features {features} (a feature folder), not both")
    if from_features and not Path(features).is_dir():
        _fail(f"--features {features!r}: give a folder of images, or --features DIR naming a feature folder")
    if not from_features and model is None:
        _fail("--model is required to embed a folder of images")
    if (shards is not None or trained_from is not None) and not from_features:
        _fail("--shards and --trained-from apply to a build from --features DIR")
    check_index_target(out_dir)  # fail before the embedding work, not after
    meta = read_metadata_file(metadata) if metadata is not None else None
    if threads:
        set_num_threads(threads)
    if from_features:
        with progress_bar("indexing shards") as update:
            index = Index.from_shards(Path(features), out_dir, kind=kind, memory_budget=budget, metadata=meta,
                                      model_source=model, progress=update, shards=_parse_shards(shards),
                                      trained_from=trained_from, **_parse_knobs(knob))
        skipped: list[tuple[str, str]] = []
    else:
        from dinokit.hub import load

        assert folder is not None and model is not None
        net = load(model)
        with progress_bar("embedding") as update:
            index = Index.build(folder, model=net, kind=kind, metadata=meta, batch_size=batch_size, device=device,
                                num_workers=workers, image_size=image_size, feature=features, progress=update,
                                memory_budget=budget, follow_links=follow_links, **_parse_knobs(knob))
        index.save(out_dir)
        skipped = index.skipped
    if as_json:
        _print_json({**index.info(), "folder": str(out_dir), "skipped": [list(s) for s in skipped]})
        return
    console.print(f"indexed {len(index)} {'vectors' if from_features else 'images'} ({index.kind}, dim "
                  f"{index.dim}) -> {out_dir}", highlight=False)
    report_skipped(skipped, "unreadable files")


@index_app.command("merge")
def index_merge_cmd(
    inputs: list[Path] = typer.Argument(..., help="Index folders to join (same model, feature kind and dimension)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Merged index folder to write (replaced atomically)."),
    memory_budget: str = typer.Option("8GB", "--memory-budget", help=_BUDGET_HELP),
    threads: int | None = typer.Option(None, "--threads", help="FAISS threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the merged index's info as JSON on stdout."),
) -> None:
    """Join indexes built on different machines (e.g. from disjoint --shards ranges) into one.

    Ids are kept when no two inputs share one, else renumbered (said on stderr); a path live in two
    inputs is an error; removed items are dropped. Inputs built with the same --trained-from index
    are joined by concatenating their inverted lists; others are re-encoded with the first one's quantizers.

    Example: dinokit index merge part0.index part1.index --out all.index
    """
    from dinokit.retrieval.index import Index
    from dinokit.retrieval.kinds import set_num_threads
    from dinokit.retrieval.stream import merge_indexes, parse_size

    try:
        budget = parse_size(memory_budget)
    except ValueError as e:
        _fail(f"--memory-budget: {e}")
    if threads:
        set_num_threads(threads)
    with progress_bar("merging") as update:
        merge_indexes(inputs, out_dir, memory_budget=budget, progress=update,
                      on_renumber=lambda why: console.print(f"note: {why}", highlight=False))
    index = Index.load(out_dir, read_only=True)
    if as_json:
        _print_json(index.info())
        return
    console.print(f"merged {len(inputs)} indexes: {len(index)} items ({index.kind}) -> {out_dir}", highlight=False)


@index_app.command("add")
def index_add_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder written by `dinokit index build`."),
    items: list[Path] = typer.Argument(..., help="Folders or image files to add; paths already indexed are skipped."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model (default: the one recorded in the index)."),
    metadata: Path | None = typer.Option(None, "--metadata", help=_METADATA_HELP),
    compact: bool = typer.Option(False, "--compact", help="Compact afterwards when it pays off "
                                 "(many small segments or removed items)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: WorkersOpt = None,
    device: str | None = typer.Option(None, "--device", help="cpu, cuda (default: cuda if available)."),
    threads: int | None = typer.Option(None, "--threads", help="FAISS threads (default: all cores)."),
) -> None:
    """Add new images to an index, in place; safe while other processes add, remove or search.

    Example: dinokit index add photos.index photos/2024/ --metadata new.jsonl
    """
    from dinokit.retrieval.kinds import set_num_threads
    from dinokit.retrieval.metadata import read_metadata_file

    if threads:
        set_num_threads(threads)
    index = _load_index(index_dir)
    net = _index_model(index, model)
    added, skipped = 0, 0
    meta = read_metadata_file(metadata) if metadata is not None else None
    for item in items:
        bar, update = _progress(f"embedding {item}")
        with bar:
            res = index.add(item if item.is_dir() else [item], model=net, metadata=meta, batch_size=batch_size,
                            device=device, num_workers=workers, progress=update)
        added += len(res.ids)
        skipped += len(res.skipped)
    if compact and index.needs_compaction:
        index.compact()
    console.print(f"added {added} images ({skipped} skipped); the index holds {len(index)}", highlight=False)


@index_app.command("search")
def index_search_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder written by `dinokit index build`."),
    queries: list[Path] = typer.Argument(..., help="Query image files."),
    k: int = typer.Option(10, "-k", "--k", help="Results per query."),
    filter_: str | None = typer.Option(None, "--filter", help='Metadata equality filter, JSON: \'{"sku": "b"}\' '
                                       "(several keys must all match)."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON on stdout."),
    sheet: Path | None = typer.Option(None, "--sheet", help="Write a contact-sheet PNG: a row per query."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model (default: the one recorded in the index)."),
    ef_search: int | None = typer.Option(None, "--ef-search", help="HNSW efSearch (default: stored knob)."),
    nprobe: int | None = typer.Option(None, "--nprobe", help="IVF-PQ lists probed (default: stored knob)."),
    threads: int | None = typer.Option(None, "--threads", help="FAISS threads (default: all cores)."),
) -> None:
    """Find the K most similar indexed images of each QUERY image (cosine similarity).

    Example: dinokit index search photos.index query.jpg -k 5 --filter '{"shop": "b"}' --sheet results.png
    """
    from dinokit.retrieval.kinds import set_num_threads
    from dinokit.retrieval.sheet import contact_sheet

    if threads:
        set_num_threads(threads)
    flt = _parse_filter(filter_)
    index = _load_index(index_dir, read_only=True)
    net = _index_model(index, model)
    res = index.search([str(q) for q in queries], k=k, filter=flt, model=net, ef_search=ef_search,
                       nprobe=nprobe)
    if sheet is not None:
        contact_sheet(res, [str(q) for q in queries], sheet, index=index)
        console.print(f"contact sheet -> {sheet}", highlight=False)
    if as_json:
        _print_json(res.to_list())
        return
    from rich.table import Table

    for row in res.to_list():
        table = Table(title=f"query: {row['query']}", title_justify="left")
        for col in ("rank", "id", "score", "path", "metadata"):
            table.add_column(col, justify="right" if col in ("rank", "id", "score") else "left")
        for r in row["results"]:
            meta = ", ".join(f"{key}={v}" for key, v in (r["metadata"] or {}).items())
            table.add_row(str(r["rank"]), str(r["id"]), f"{r['score']:.4f}", r["path"], meta)
        out.print(table)


@index_app.command("info")
def index_info_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder written by `dinokit index build`."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show what an index holds: count, kind, knobs, segments, memory, model, feature kind.

    Example: dinokit index info photos.index
    """
    info = _load_index(index_dir, read_only=True).info()
    if as_json:
        _print_json(info)
        return
    from rich.table import Table

    table = Table(show_header=False, title=str(index_dir), title_justify="left")
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        table.add_row(key, str(value))
    out.print(table)


@index_app.command("remove")
def index_remove_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder written by `dinokit index build`."),
    items: list[str] = typer.Argument(..., help="Item ids (as `index search` prints them) or stored paths."),
) -> None:
    """Remove items from an index, in place; unknown ids and paths are ignored.

    Example: dinokit index remove photos.index 17 42 cats/003.jpg
    """
    index = _load_index(index_dir)
    ids = []
    for item in items:
        if item.lstrip("-").isdigit():
            ids.append(int(item))
        elif item in index:
            ids.append(index.id_of(item))
    n = index.remove(ids)
    console.print(f"removed {n} of {len(items)} items; the index holds {len(index)}", highlight=False)


@index_app.command("compact")
def index_compact_cmd(
    index_dir: Path = typer.Argument(..., help="Index folder written by `dinokit index build`."),
    threads: int | None = typer.Option(None, "--threads", help="FAISS threads (default: all cores)."),
) -> None:
    """Fold small segments into the main index and drop removed vectors (crash-safe; kind auto re-decided).

    Example: dinokit index compact photos.index
    """
    from dinokit.retrieval.kinds import set_num_threads

    if threads:
        set_num_threads(threads)
    index = _load_index(index_dir)
    index.compact()
    console.print(f"compacted: {len(index)} items in one {index.kind} index", highlight=False)


@index_app.command("migrate")
def index_migrate_cmd(
    old: Path = typer.Argument(..., help="Index folder of the old format (index.faiss, meta.json, paths.json)."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Write the new index here (default: "
                                        "replace OLD in place, atomically)."),
) -> None:
    """Convert an index folder of the old format to the store format (ids, metadata, concurrent writers).

    Example: dinokit index migrate photos.index --out photos.v2.index
    """
    from dinokit.retrieval.folder import is_v1_folder

    if old.is_dir() and not is_v1_folder(old):
        _fail(f"{old}: not an index of the old format (nothing to migrate)")
    index = _load_index(old)
    index.save(out_dir or old)
    console.print(f"migrated {len(index)} items ({index.kind}) -> {out_dir or old}", highlight=False)
