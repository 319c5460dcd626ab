"""The ``dinokit`` commands: knn-eval, linear-eval and classify."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import typer

from dinokit._io import write_json
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
    emit,
    image_files,
    out,
    progress_bar,
    report_skipped,
)

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


def _load_eval_data(model: str, train: str, val: str | None) -> tuple[Any, Any, Any]:
    from dinokit.data.labeled import align_classes, resolve_labeled
    from dinokit.hub import load

    net = load(model)
    tr = resolve_labeled(train, "train")
    va = align_classes(tr, resolve_labeled(val, "test")) if val is not None else None
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
    model: ModelOpt,
    train: str = typer.Option(..., "--train", help=f"Train set: {_DATA_HELP}; default split train."),
    val: str = typer.Option(..., "--val", help=f"Val set: {_DATA_HELP}; default split test."),
    k: list[str] = typer.Option(["10", "20", "100", "200"], "--k", "-k",
                                help="Neighbour counts, all scored with one search: --k 10 20 100 200 or --k 20."),
    temperature: float = typer.Option(0.07, "--temperature", "-T", help="Vote temperature T: weights exp(sim / T)."),
    as_json: JsonOpt = False,
    json_out: Path | None = typer.Option(None, "--json-out", help="Write the results as JSON here, and the confusion "
                                         "matrix / per-class PNGs beside it (<stem>.confusion.png, ...). Default: no files."),
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    image_size: ImageSizeOpt = None,
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

    Example: dinokit knn-eval --model dino_vits16 --train fashion-mnist --val fashion-mnist --k 10 20 --json-out knn.json
    """
    import time

    from dinokit.embedding import EmbedOptions
    from dinokit.eval.cache import embed_labeled
    from dinokit.eval.knn import Backend, Precision, knn_classify_multi, knn_report
    from dinokit.models.backbone import identity

    ks = _parse_ks(k, list(ctx.args))
    if temperature <= 0:
        _fail(f"--temperature {temperature}: must be > 0")
    if backend not in ("torch", "faiss") or precision not in ("auto", "fp32", "bf16"):
        _fail(f"--backend {backend!r} / --precision {precision!r}: expected torch|faiss and auto|fp32|bf16")
    net, tr, va = _load_eval_data(model, train, val)
    t0 = time.perf_counter()
    opts = EmbedOptions(features=features, batch_size=batch_size, device=device, num_workers=workers,
                        image_size=image_size)
    with progress_bar("embedding train") as update:
        xtr, ytr, sk_tr = embed_labeled(net, tr, opts, use_cache=not no_cache, progress=update)
    with progress_bar("embedding val") as update:
        xva, yva, sk_va = embed_labeled(net, va, opts, use_cache=not no_cache, progress=update)
    t1 = time.perf_counter()
    if len(ytr) == 0 or len(yva) == 0:
        _fail("no readable images in the " + ("train" if len(ytr) == 0 else "val") + " set")
    res = knn_classify_multi(xtr, ytr, xva, yva, ks=ks, T=temperature, num_classes=len(tr.classes),
                             backend=cast(Backend, backend), precision=cast(Precision, precision),
                             device=device if device is not None else "cpu" if backend == "faiss" else None)
    t2 = time.perf_counter()
    skipped = [*sk_tr, *sk_va]
    report_skipped(skipped, "unreadable images")
    ident = identity(net)
    report = knn_report(res, tr.classes, T=temperature, features=features, train=train, val=val,
                        num_train=len(ytr), skipped=skipped, seconds={"embedding": t1 - t0, "knn": t2 - t1},
                        model={"source": model, "name": ident["name"], "arch": ident["arch"],
                               "fingerprint": ident["fingerprint"]})
    if not as_json:
        _print_knn_tables(report, ks, yva)
        console.print(f"embedding {t1 - t0:.1f} s, k-NN {t2 - t1:.2f} s", highlight=False)
    emit(report, as_json, json_out)
    if json_out is not None:
        kp = 20 if 20 in ks else ks[0]
        pics = _eval_pictures(f"{json_out.with_suffix('')}.", res[kp]["confusion"], res[kp]["per_class"], tr.classes,
                              res[kp]["top1"], f"k-NN k={kp}")
        console.print(f"wrote {json_out}, {pics[0].name}, {pics[1].name}", highlight=False)


def _print_knn_tables(report: dict[str, Any], ks: list[int], val_labels: Any) -> None:
    """The k-NN scores and the per-class table (stdout)."""
    import numpy as np
    from rich.table import Table

    classes, res = report["classes"], report["results"]
    table = Table(title=f"weighted k-NN, T={report['temperature']:g}",
                  caption=f"{report['num_train']} train, {report['num_val']} val, {len(classes)} classes")
    for col in ("k", "top-1 %", "top-5 %"):
        table.add_column(col, justify="right")
    for kk in ks:
        table.add_row(str(kk), f"{res[str(kk)]['top1']:.2f}", f"{res[str(kk)]['top5']:.2f}")
    out.print(table)
    pc = Table(title="per-class top-1 %")
    pc.add_column("class")
    pc.add_column("val images", justify="right")
    for kk in ks:
        pc.add_column(f"k={kk}", justify="right")
    counts = np.bincount(np.asarray(val_labels), minlength=len(classes))
    for ci, name in enumerate(classes):
        cells = [_pct(res[str(kk)]["per_class"][name]) for kk in ks]
        pc.add_row(name, str(int(counts[ci])), *cells)
    out.print(pc)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@app.command("linear-eval")
def linear_eval_cmd(
    model: ModelOpt,
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
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    image_size: ImageSizeOpt = None,
    seed: int = typer.Option(0, "--seed", help="Random seed (init, shuffling, augmentation)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache. Default: off (cache used)."),
    as_json: JsonOpt = False,
) -> None:
    """Linear probe of a frozen model: train one linear layer, report top-1 / top-5, save the head.

    The saved head predicts labels with: dinokit classify --model SRC --head OUT/head.safetensors IMAGES...

    Example: dinokit linear-eval --model dino_vits16 --train fashion-mnist --val fashion-mnist --fast --out probe/
    """
    from rich.table import Table

    from dinokit.eval.linear import linear_probe

    net, tr, va = _load_eval_data(model, train, val)
    with progress_bar("linear probe") as update:
        res = linear_probe(net, tr, va, fast=fast, features=features, epochs=epochs, lr=lr, batch_size=batch_size,
                           device=device, num_workers=workers, image_size=image_size, use_cache=not no_cache,
                           seed=seed, progress=update)
    report_skipped([tuple(s) for s in res.settings.get("skipped", [])], "unreadable images")
    head_path = res.head.save(out_dir / "head.safetensors")
    metrics = {"model": model, "train": train, "val": val, **res.metrics()}
    write_json(out_dir / "metrics.json", metrics)
    _eval_pictures(f"{out_dir}/", res.confusion, res.per_class, res.head.classes, res.top1,
                   "linear probe")
    if as_json:
        _print_json({**metrics, "head": str(head_path), "metrics_file": str(out_dir / "metrics.json")})
        return
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
    as_json: JsonOpt = False,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = None,
    workers: int = typer.Option(0, "--workers", help="Decoding processes (0: decode in this process)."),
) -> None:
    """Predict class labels for images with a backbone and a linear head from linear-eval.

    Example: dinokit classify --model dino_vits16 --head probe/head.safetensors photo1.jpg photos/
    """
    from rich.table import Table

    from dinokit.eval.linear import LinearHead, classify
    from dinokit.hub import load

    paths = image_files(images)
    clf = LinearHead.load(head)
    net = load(model)
    rows, skipped = classify(net, clf, paths, topk=top_k, batch_size=batch_size, device=device,
                             num_workers=workers)
    report_skipped(skipped, "unreadable images")
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


