"""`make demo`: the whole toolkit on real images with the shipped Fashion-MNIST DINO model.

Runs the real ``dinokit`` command line, step by step, on the PNG slice in recipes/data/ and writes
everything to ``--out`` (default demo-out/):

 1. embed          features of the train images                    -> train.npz
 2. knn-eval       weighted k-NN (k=10, 20) on the val images      -> knn.json, confusion/per-class PNGs
 3. linear-eval    fast linear probe on cached features            -> linear/
 4. index          FAISS index of the train images + 4 queries     -> index/, search.png, search.json
 5. train          a short run of recipes/fashion_mnist_vit_cpu.yaml on the PNGs, with a k-NN
                   monitor on the val PNGs                          -> run/, run/curves.png
 6. export         the run's teacher as a timm folder              -> exported/
 7. reload         timm.create_model("local-dir:exported") == dinokit.load("exported")
 8. attention      attention maps of 3 val images with that ViT    -> attention/
                   (the shipped model is a ResNet: convnets have no attention maps)

    python recipes/demo.py [--out demo-out] [--quick] [--train-minutes 1.5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data" / "fashion-mnist-small"
MODEL = ROOT / "models" / "fashion_mnist_dino"
RECIPE = HERE / "fashion_mnist_vit_cpu.yaml"


def dinokit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run one `dinokit` command and echo it; its progress bars and messages (stderr) show live, its
    results (stdout) are kept for the next steps. Fail loudly if it fails."""
    cmd = [sys.executable, "-m", "dinokit.cli", *map(str, args)]
    print("\n$ dinokit " + " ".join(map(str, args)), flush=True)
    res = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=None)
    if res.returncode != 0:
        sys.stderr.write(res.stdout)
        raise SystemExit(f"demo step failed: dinokit {args[0]} (exit {res.returncode})")
    return res


def subset(src: Path, dst: Path, per_class: int) -> Path:
    """Copy the first ``per_class`` images of each class folder (for --quick)."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy2(f, dst / cls.name / f.name)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "demo-out", help="output folder (replaced)")
    p.add_argument("--model", type=Path, default=MODEL, help="model to use for steps 1-5")
    p.add_argument("--quick", action="store_true", help="tiny subset and a few training steps (for tests)")
    p.add_argument("--train-minutes", type=float, default=1.5, help="wall-clock budget of step 6")
    a = p.parse_args()
    t0 = time.time()
    out: Path = a.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train, val = DATA / "train", DATA / "val"
    if a.quick:
        train = subset(train, out / "data" / "train", 6)
        val = subset(val, out / "data" / "val", 3)
    model = a.model

    dinokit("embed", train, "--model", model, "--out", out / "train.npz")
    dinokit("knn-eval", "--model", model, "--train", train, "--val", val, "--k", "10,20",
            "--json-out", out / "knn.json")
    dinokit("linear-eval", "--model", model, "--train", train, "--val", val, "--fast", "--out", out / "linear")
    dinokit("index", "build", train, "--model", model, "--out", out / "index")
    queries = [sorted(d.iterdir())[0] for d in sorted(val.iterdir()) if d.is_dir()][:4]
    res = dinokit("index", "search", out / "index", *queries, "-k", "8", "--json", "--sheet", out / "search.png")
    (out / "search.json").write_text(res.stdout)

    # a schedule longer than the budget: max_minutes ends the run (with a checkpoint) on time
    overrides = {"data.source": train, "knn.train_source": train, "knn.val_source": val,
                 "max_minutes": a.train_minutes, "optim.epochs": 100, "knn.every_epochs": 10}
    if a.quick:
        overrides.update({"max_iterations": 2, "optim.batch_size_per_gpu": 16, "precision": "fp32"})
    sets = [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]
    dinokit("train", RECIPE, *sets, "--out", out / "run")
    dinokit("plot", out / "run", "--out", out / "run" / "curves.png")
    dinokit("export", out / "run", "--out", out / "exported")

    import timm
    import torch

    import dinokit as dk

    print("$ python -c 'timm.create_model(\"local-dir:exported\", pretrained=True)'  # same features?")
    x = torch.randn(2, 3, 32, 32)
    ours = dk.load(str(out / "exported"))
    theirs = timm.create_model(f"local-dir:{out / 'exported'}", pretrained=True).eval()
    with torch.inference_mode():
        diff = float((ours(x) - theirs(x)).abs().max())
    if diff > 1e-4:
        raise SystemExit(f"exported model differs between dinokit and timm (max abs diff {diff:.2e})")
    dinokit("attention", *queries[:3], "--model", out / "exported", "--out", out / "attention",
            "--image-size", "128")

    knn = json.loads((out / "knn.json").read_text())
    linear = json.loads((out / "linear" / "metrics.json").read_text())
    run = json.loads((out / "run" / "summary.json").read_text())
    summary = {
        "knn": knn, "linear": linear, "train": run, "timm_reload_max_abs_diff": diff,
        "minutes": round((time.time() - t0) / 60, 2),
        "pictures": sorted(str(p.relative_to(out)) for p in out.rglob("*.png") if "data" not in p.parts),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    top1 = {k: round(v["top1"], 1) for k, v in knn["results"].items()}
    print(f"\ndemo finished in {summary['minutes']} min; everything is in {out}/")
    print(f"  k-NN top-1 (shipped model, {knn['num_train']} train / {knn['num_val']} val PNGs): "
          + ", ".join(f"k={k}: {v}%" for k, v in top1.items()))
    print(f"  linear probe (--fast) top-1: {linear['top1']:.1f}%")
    run_knn = (run.get("knn") or {}).get("top1")
    print(f"  training: {run['iterations']} iterations in {run['train_time_s'] / 60:.1f} min at "
          f"{run['images_per_s']:.0f} img/s" + (f", k-NN monitor {run_knn:.1f}%" if run_knn is not None else ""))
    print(f"  export reloads in timm with the same features (max abs diff {diff:.1e})")
    print("  pictures: search.png (contact sheet), knn.confusion.png, knn.per_class.png, linear/*.png, "
          "run/curves.png, attention/<image>/overlay.png (and per-head maps and masks)")

if __name__ == "__main__":
    main()
