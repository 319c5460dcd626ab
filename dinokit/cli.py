"""The ``dinokit`` command line: a thin typer layer over the Python API.

Commands parse options, call the API and render results (rich tables, progress bars, JSON).
No logic that a Python user would also want lives here.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from dinokit._io import write_json

app = typer.Typer(
    name="dinokit",
    help="DINO self-supervised vision models: train, publish, embed, evaluate, search, attention maps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
index_app = typer.Typer(help="FAISS image search: build, add to, search and inspect an index.", no_args_is_help=True)
app.add_typer(index_app, name="index")

console = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit; used for every expected user error."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _progress(description: str) -> Any:
    """A transient rich progress bar on stderr and the ``progress(done, total)`` callback that drives it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task(description, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages to stderr.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


# ---------------------------------------------------------------- foundation: models, convert, embed


@app.command("models")
def models_cmd(as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
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
) -> None:
    """Convert any DINO checkpoint into a timm-compatible folder.

    Example: dinokit convert dino_deitsmall16_pretrain.pth --out dino-vits16/
    """
    from dinokit.hub import load, save
    from dinokit.models.backbone import identity

    if which not in ("teacher", "student"):
        _fail(f"--which {which!r}: expected teacher or student")
    try:
        model = load(source, which=which)
        folder = save(model, out_dir, name=name)
    except (FileNotFoundError, ValueError, OSError) as exc:
        _fail(str(exc))
    ident = identity(model)
    console.print(f"{source} -> {folder} ({ident['arch']}, {ident['num_features']}-d features, "
                  f"fingerprint {ident['fingerprint']})", highlight=False)


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
    features: str = typer.Option("cls", "--features", help="cls, cls+avgpool, last4 (any lastN) or patch."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image instead of skipping it."),
) -> None:
    """Embed every image under IMAGES with a DINO model and write the features.

    Example: dinokit embed photos/ --model dino_vits16 --out photos.npz
    """
    from dinokit.data.images import ImageError
    from dinokit.embed import embed
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



# ---------------------------------------------------------------- training: train


@app.command("train")
def train_cmd(
    recipe: Path = typer.Argument(None, help="Training recipe (YAML/JSON). Optional with --resume (uses RUN_DIR/config.json)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set optim.lr=0.001 (repeatable)."),
    out_dir: Path = typer.Option(None, "--out", help="Run folder (default: runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint.pth."),
    init: str = typer.Option(None, "--init", help="Start from a full checkpoint (heads included) or any dinokit.load source."),
) -> None:
    """Train a DINO model (multi-crop, EMA teacher, centering + sharpening); torchrun for several GPUs.

    The run folder gets config.json (the resolved recipe), checkpoint.pth (atomic, every checkpoint_every epochs and at the end), log_iter.jsonl, log_epoch.jsonl, log_knn.jsonl and summary.json, also printed as JSON at the end. A misspelled key is an error naming it.

    Example: dinokit train recipes/fashion_mnist_cpu.yaml --set max_minutes=5 --out runs/fmnist

    Several GPUs: torchrun --nproc_per_node 8 -m dinokit.cli train recipes/dino_vits16_in1k.yaml --out runs/v
    """
    from dinokit.train.config import ConfigError, load_config

    if recipe is None and not resume:
        _fail("give a RECIPE.yaml (or --resume with --out RUN_DIR)")
    if out_dir is None:
        if recipe is None:
            _fail("--resume without a recipe needs --out RUN_DIR")
        out_dir = Path("runs") / recipe.stem
    try:
        if recipe is None:
            cfg_file = out_dir / "config.json"
            if not cfg_file.is_file():
                _fail(f"{cfg_file}: no config to resume from")
            cfg = load_config(cfg_file, list(set_))
        else:
            cfg = load_config(recipe, list(set_))
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from dinokit import distributed
    from dinokit.train import loop

    bar = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    task = bar.add_task("train", total=None, stats="")

    def update(done: int, total: int, stats: dict[str, Any]) -> None:
        text = (f"ep {stats['epoch']} loss {stats['loss']:.4f} lr {stats['lr']:.2e} "
                f"tt {stats['teacher_temp']:.3f} {stats['images_per_s']:.0f} img/s")
        bar.update(task, completed=done, total=total, stats=text)

    try:
        with bar if distributed.local_rank() == 0 else _nullctx():
            summary = loop.train(cfg, out_dir, resume=resume, init=init, progress=update)
    except loop.TrainingDiverged as e:
        _fail(str(e))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e).splitlines()[0])
    if distributed.is_main_process():
        _print_json(summary)
    distributed.shutdown()


def _nullctx() -> Any:
    from contextlib import nullcontext

    return nullcontext()



# ---------------------------------------------------------------- evaluation: knn-eval, linear-eval, classify


_DATA_HELP = ("class-subfolder image folder (DIR/<class>/<image>) or fashion-mnist[:PATH][@train|@test][#N] "
              "(#N keeps the first N images)")


def _parse_ks(values: list[str], extra: list[str]) -> list[int]:
    """--k 10 --k 20, --k 10,20 and --k 10 20 100 200 (extra words after --k) all give [10, 20, ...]."""
    ks: list[int] = []
    for word in [*values, *extra]:
        for part in word.replace(",", " ").split():
            if not part.isdigit() or int(part) < 1:
                _fail(f"--k {part!r}: expected positive integers, e.g. --k 10 20 100 200")
            ks.append(int(part))
    return sorted(set(ks), key=ks.index)


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable images:[/]")
        for path, reason in skipped:
            console.print(f"  {path}: {reason}", highlight=False, markup=False)


def _load_eval_data(model: str, train: str, val: str | None) -> tuple[Any, Any, Any]:
    from dinokit.data.labeled import align_classes, resolve_labeled
    from dinokit.hub import load

    try:
        net = load(model)
        tr = resolve_labeled(train, "train")
        va = align_classes(tr, resolve_labeled(val, "test")) if val is not None else None
    except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as exc:
        _fail(str(exc))
    return net, tr, va


def _eval_pictures(prefix: str, confusion: Any, per_class: list[float | None], classes: list[str],
                   top1: float, what: str) -> list[Path]:
    """``<prefix>confusion.png`` and ``<prefix>per_class.png``."""
    from dinokit.eval.plots import plot_confusion, plot_per_class

    return [
        plot_confusion(confusion, classes, f"{prefix}confusion.png", title=f"{what}: confusion matrix"),
        plot_per_class(per_class, classes, f"{prefix}per_class.png", title=f"{what}: per-class top-1",
                       overall=top1),
    ]


@app.command("knn-eval", context_settings={"allow_extra_args": True})
def knn_eval_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="Model: registry name, folder, file or HF repo id."),
    train: str = typer.Option(..., "--train", help=f"Train set: {_DATA_HELP}; default split train."),
    val: str = typer.Option(..., "--val", help=f"Val set: {_DATA_HELP}; default split test."),
    k: list[str] = typer.Option(["10", "20", "100", "200"], "--k", "-k",
                                help="Neighbour counts, all scored with one search: --k 10 20 100 200 or --k 20."),
    temperature: float = typer.Option(0.07, "--temperature", "-T", help="Vote temperature T: weights exp(sim / T)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results as JSON here, and the confusion "
                                         "matrix / per-class PNGs beside it (<stem>.confusion.png, ...). Default: no files."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass when embedding."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
    workers: int | None = typer.Option(None, "--workers", help="Decoding processes (default: cores - 1)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Eval crop size (default: the model's)."),
    features: str = typer.Option("cls", "--features", help="Feature kind: cls (official), cls+avgpool, lastN."),
    backend: str = typer.Option("torch", "--backend", help="Search: torch (chunked, CPU/GPU) or faiss (IndexFlatIP)."),
    precision: str = typer.Option("auto", "--precision", help="torch search: auto, fp32, or bf16 (bf16 candidates "
                                  "re-ranked exactly; same result as fp32)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache "
                                  "($DINOKIT_CACHE, default ~/.cache/dinokit). Default: off (cache used)."),
) -> None:
    """Weighted k-NN accuracy (DINO's official protocol) of a model on a labeled train / val set.

    Features: dinokit.embed with the official eval preprocessing, cached on disk by model and data.

    A second run with other k is near instant. Unreadable images are skipped and reported.

    Example: dinokit knn-eval --model dino_vits16 --train fashion-mnist --val fashion-mnist --k 10 20 --json knn.json
    """
    import time

    import numpy as np
    from rich.table import Table

    from dinokit.eval.cache import embed_labeled
    from dinokit.eval.knn import knn_classify_multi

    ks = _parse_ks(k, list(ctx.args))
    if temperature <= 0:
        _fail(f"--temperature {temperature}: must be > 0")
    if backend not in ("torch", "faiss") or precision not in ("auto", "fp32", "bf16"):
        _fail(f"--backend {backend!r} / --precision {precision!r}: expected torch|faiss and auto|fp32|bf16")
    net, tr, va = _load_eval_data(model, train, val)
    t0 = time.perf_counter()
    kw = dict(features=features, batch_size=batch_size, device=device, num_workers=workers, image_size=image_size,
              use_cache=not no_cache)
    try:
        bar, update = _progress("embedding train")
        with bar:
            xtr, ytr, sk_tr = embed_labeled(net, tr, progress=update, **kw)
        bar, update = _progress("embedding val")
        with bar:
            xva, yva, sk_va = embed_labeled(net, va, progress=update, **kw)
    except (FileNotFoundError, ValueError, OSError) as exc:
        _fail(str(exc))
    t1 = time.perf_counter()
    if len(ytr) == 0 or len(yva) == 0:
        _fail("no readable images in the " + ("train" if len(ytr) == 0 else "val") + " set")
    res = knn_classify_multi(xtr, ytr, xva, yva, ks=ks, T=temperature, num_classes=len(tr.classes),
                             backend=backend, precision=precision,
                             device=device if device is not None else "cpu" if backend == "faiss" else None)
    t2 = time.perf_counter()
    skipped = [*sk_tr, *sk_va]
    _report_skipped(skipped)

    table = Table(title=f"weighted k-NN, T={temperature:g}",
                  caption=f"{len(ytr)} train, {len(yva)} val, {len(tr.classes)} classes")
    for col in ("k", "top-1 %", "top-5 %"):
        table.add_column(col, justify="right")
    for kk in ks:
        table.add_row(str(kk), f"{res[kk]['top1']:.2f}", f"{res[kk]['top5']:.2f}")
    out.print(table)
    pc = Table(title="per-class top-1 %")
    pc.add_column("class")
    pc.add_column("val images", justify="right")
    for kk in ks:
        pc.add_column(f"k={kk}", justify="right")
    counts = np.bincount(np.asarray(yva), minlength=len(tr.classes))
    for ci, name in enumerate(tr.classes):
        cells = ["-" if res[kk]["per_class"][ci] is None else f"{res[kk]['per_class'][ci]:.1f}" for kk in ks]
        pc.add_row(name, str(int(counts[ci])), *cells)
    out.print(pc)
    console.print(f"embedding {t1 - t0:.1f} s, k-NN {t2 - t1:.2f} s", highlight=False)

    if json_out is not None:
        from dinokit.models.backbone import identity

        ident = identity(net)
        data = {
            "model": {"source": model, "name": ident["name"], "arch": ident["arch"],
                      "fingerprint": ident["fingerprint"]},
            "train": train, "val": val, "num_train": len(ytr), "num_val": len(yva), "classes": tr.classes,
            "temperature": temperature, "features": features,
            "results": {str(kk): {"top1": res[kk]["top1"], "top5": res[kk]["top5"],
                                  "per_class": dict(zip(tr.classes, res[kk]["per_class"], strict=True)),
                                  "confusion": res[kk]["confusion"]} for kk in ks},
            "skipped": [list(s) for s in skipped],
            "seconds": {"embedding": t1 - t0, "knn": t2 - t1},
        }
        write_json(json_out, data)
        kp = 20 if 20 in ks else ks[0]
        pics = _eval_pictures(f"{json_out.with_suffix('')}.", res[kp]["confusion"], res[kp]["per_class"], tr.classes,
                              res[kp]["top1"], f"k-NN k={kp}")
        console.print(f"wrote {json_out}, {pics[0].name}, {pics[1].name}", highlight=False)


@app.command("linear-eval")
def linear_eval_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Model: registry name, folder, file or HF repo id."),
    train: str = typer.Option(..., "--train", help=f"Train set: {_DATA_HELP}; default split train."),
    val: str = typer.Option(..., "--val", help=f"Val set: {_DATA_HELP}; default split test."),
    fast: bool = typer.Option(False, "--fast", help="Train on cached frozen features without augmentation "
                              "(seconds on a CPU) instead of the official protocol (RandomResizedCrop + flip, "
                              "backbone forward every epoch). Default: off (official)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default: 100 official, 30 --fast)."),
    lr: float | None = typer.Option(None, "--lr", help="Base lr, scaled by batch/256 (default: 0.001 official; "
                                    "--fast sweeps 0.001, 0.01, 0.1, 1 and keeps the best on 10% of train)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size (default: 128 official, "
                                          "1024 --fast)."),
    features: str | None = typer.Option(None, "--features", help="Feature kind (default: the official one: "
                                        "last4 for ViT-S, cls+avgpool for ViT-B, cls for CNNs)."),
    out_dir: Path = typer.Option(Path("linear-eval"), "--out", "-o", help="Folder for head.safetensors, "
                                 "metrics.json, confusion.png and per_class.png."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
    workers: int | None = typer.Option(None, "--workers", help="Decoding processes (default: cores - 1)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Crop size (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (init, shuffling, augmentation)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache. Default: off (cache used)."),
) -> None:
    """Linear probe of a frozen model: train one linear layer, report top-1 / top-5, save the head.

    The saved head predicts labels with: dinokit classify --model SRC --head OUT/head.safetensors IMAGES...

    Example: dinokit linear-eval --model dino_vits16 --train fashion-mnist --val fashion-mnist --fast --out probe/
    """
    from rich.table import Table

    from dinokit.eval.linear import linear_probe

    net, tr, va = _load_eval_data(model, train, val)
    bar, update = _progress("linear probe")
    try:
        with bar:
            res = linear_probe(net, tr, va, fast=fast, features=features, epochs=epochs, lr=lr, batch_size=batch_size,
                               device=device, num_workers=workers, image_size=image_size, use_cache=not no_cache,
                               seed=seed, progress=update)
    except (FileNotFoundError, ValueError, OSError) as exc:
        _fail(str(exc))
    _report_skipped([tuple(s) for s in res.settings.get("skipped", [])])
    head_path = res.head.save(out_dir / "head.safetensors")
    metrics = {"model": model, "train": train, "val": val, **res.metrics()}
    write_json(out_dir / "metrics.json", metrics)
    _eval_pictures(f"{out_dir}/", res.confusion, res.per_class, res.head.classes, res.top1,
                   "linear probe")
    s = res.settings
    table = Table(title=f"linear probe ({s['mode']})",
                  caption=f"{s['features']} features, {s['epochs']} epochs, lr {s['lr']:g}")
    for col in ("top-1 %", "top-5 %", "train", "val"):
        table.add_column(col, justify="right")
    table.add_row(f"{res.top1:.2f}", f"{res.top5:.2f}", str(s["num_train"]), str(s["num_val"]))
    out.print(table)
    console.print(f"wrote {head_path}, {out_dir / 'metrics.json'}, pictures in {out_dir}", highlight=False)


@app.command("classify")
def classify_cmd(
    images: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
    model: str = typer.Option(..., "--model", "-m", help="The backbone the head was trained on."),
    head: Path = typer.Option(..., "--head", help="A head.safetensors written by dinokit linear-eval."),
    top_k: int = typer.Option(1, "--top-k", help="Print the k most likely classes per image."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (path, label, prob, topk) instead of a table. Default: off."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
    workers: int = typer.Option(0, "--workers", help="Decoding processes (0: decode in this process)."),
) -> None:
    """Predict class labels for images with a backbone and a linear head from linear-eval.

    Example: dinokit classify --model dino_vits16 --head probe/head.safetensors photo1.jpg photos/
    """
    from rich.table import Table

    from dinokit.data.images import list_images
    from dinokit.eval.linear import LinearHead, classify
    from dinokit.hub import load

    paths: list[Path] = []
    for p in images:
        if p.is_dir():
            paths.extend(list_images(p))
        elif p.is_file():
            paths.append(p)
        else:
            _fail(f"{p}: no such file or folder")
    if not paths:
        _fail("no images given")
    try:
        clf = LinearHead.load(head)
        net = load(model)
        rows, skipped = classify(net, clf, paths, topk=top_k, batch_size=batch_size, device=device,
                                 num_workers=workers)
    except (FileNotFoundError, ValueError, OSError) as exc:
        _fail(str(exc))
    _report_skipped(skipped)
    if as_json:
        _print_json({"head": str(head), "model": model, "predictions": rows, "skipped": [list(s) for s in skipped]})
        return
    table = Table(title=f"{len(rows)} images, head {head.name} ({clf.num_classes} classes)")
    table.add_column("image")
    table.add_column("label")
    table.add_column("prob", justify="right")
    if top_k > 1:
        table.add_column(f"top-{top_k}")
    for r in rows:
        cells = [r["path"], r["label"], f"{r['prob']:.3f}"]
        if top_k > 1:
            cells.append(", ".join(f"{lab} {q:.2f}" for lab, q in r["topk"]))
        table.add_row(*cells)
    out.print(table)


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
    from dinokit.retrieval import Index

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
    from dinokit.retrieval import Index, check_index_target, set_num_threads

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
    from dinokit.retrieval import set_num_threads

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
    from dinokit.retrieval import ModelMismatchError, contact_sheet, set_num_threads

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


# ---------------------------------------------------------------- publishing: export, push, plot


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A `dinokit train` run folder (checkpoint.pth, config.json, logs)."),
    out_folder: Path = typer.Option(..., "--out", "-o", help="Folder to write (config.json, model.safetensors, README.md)."),
    which: str = typer.Option("teacher", "--which", help="Backbone to export: teacher or student."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Another checkpoint file of the run."),
    name: str | None = typer.Option(None, "--name", help="Model name on the card [default: folder name]."),
    hardware: str | None = typer.Option(None, "--hardware", help="What the run trained on, for the card."),
) -> None:
    """Export a run's backbone as a timm-compatible folder with a model card (recipe, data, time, k-NN).

    The folder (config.json + model.safetensors + README.md) loads with dinokit.load(FOLDER) and timm.create_model("local-dir:FOLDER", pretrained=True), and `dinokit push` uploads it.

    Example: dinokit export runs/fmnist --out fmnist-dino/ --which teacher
    """
    from dinokit.hub import CheckpointError
    from dinokit.publish import export

    try:
        folder = export(run_dir, out_folder, which=which, checkpoint=checkpoint, name=name, hardware=hardware)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        _fail(str(exc))
    info = json.loads((folder / "config.json").read_text()).get("dinokit_train", {})
    knn = info.get("knn") or {}
    top1 = f", k-NN top-1 {knn['top1']:.2f}%" if knn.get("top1") is not None else ""
    console.print(f"exported the {which} of {run_dir} ({info.get('iterations')} iterations{top1})", highlight=False)
    out.print(str(folder), highlight=False, soft_wrap=True)


@app.command("push")
def push_cmd(
    folder: Path = typer.Argument(..., help="An exported model folder (config.json + model.safetensors)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub model repo, org/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to push to (created from main)."),
    token: str | None = typer.Option(None, "--token", help="Hub token; default HF_TOKEN or the saved login."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
) -> None:
    """Upload an exported model folder to the Hugging Face Hub and print the commit URL.

    The repo is created when missing (private with --private). Without a token or a network this is a one-line error.

    Example: dinokit push fmnist-dino/ --repo-id me/fmnist-dino --private
    """
    from dinokit.publish import PushError, push

    try:
        url = push(folder, repo_id, private=private, revision=revision, token=token, commit_message=message)
    except (FileNotFoundError, ValueError, PushError) as exc:
        _fail(str(exc))
    out.print(url, highlight=False, soft_wrap=True)


@app.command("plot")
def plot_cmd(
    run_dir: Path = typer.Argument(..., help="A training run folder (log_iter.jsonl, log_knn.jsonl)."),
    out_png: Path | None = typer.Option(None, "--out", "-o", help="PNG to write [default: RUN_DIR/curves.png]."),
    x: str = typer.Option("iteration", "--x", help="x axis: iteration or minutes."),
) -> None:
    """Draw loss, learning rate, teacher temperature and k-NN curves of a run to PNG.

    Reads RUN_DIR/log_iter.jsonl and log_knn.jsonl (after a resume the last record of each iteration wins).

    Example: dinokit plot runs/fmnist --out curves.png --x minutes
    """
    from dinokit.train.plot import plot_run

    try:
        path = plot_run(run_dir, out_png, x=x)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    out.print(str(path), highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
