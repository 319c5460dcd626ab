"""Fast-mode linear probe on Fashion-MNIST features: accuracy and time on the CPU.

Features of all 60,000 train and 10,000 test images are extracted once with the official eval
preprocessing (and cached, like ``dinokit linear-eval --fast``); the timed part is
:func:`dinokit.eval.linear.fit_linear` (4 learning rates trained at once, best on 10% of train,
refit on all of it) plus the test evaluation. For reference the same features also get the k-NN
score and scikit-learn's LogisticRegression (lbfgs) is timed on them.

Model: ``models/fashion_mnist_dino`` when it exists (the shipped demo model), else a seeded
random-init tiny ViT (32 px, patch 8, depth 4, width 192): its features are weak, so read the time,
and compare accuracies only between methods.

Run: ``.venv/bin/python benchmarks/linear.py [--model PATH] [--epochs 30] [--no-sklearn]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dinokit.data.labeled import resolve_labeled
from dinokit.eval.cache import embed_labeled
from dinokit.eval.knn import knn_classify
from dinokit.eval.linear import default_features, evaluate_head, fit_linear

DEMO = Path(__file__).resolve().parent.parent / "models" / "fashion_mnist_dino"


def get_model(path: str | None) -> tuple[torch.nn.Module, str]:
    src = Path(path) if path else DEMO
    if src.exists():
        from dinokit.hub import load

        return load(str(src)), str(src)
    from dinokit.models.backbone import create_backbone

    torch.manual_seed(0)
    model = create_backbone("vit_small_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=192, num_heads=3)
    return model, "random-init ViT (32 px, patch 8, depth 4, width 192)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-sklearn", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, name = get_model(args.model)
    kind = default_features(model)
    train, test = resolve_labeled("fashion-mnist"), resolve_labeled("fashion-mnist", "test")
    t = time.perf_counter()
    xtr, ytr, _ = embed_labeled(model, train, features=kind, batch_size=256)
    xte, yte, _ = embed_labeled(model, test, features=kind, batch_size=256)
    t_embed = time.perf_counter() - t
    print(f"model: {name}; features {kind} {tuple(xtr.shape)}; embedding (or cache) {t_embed:.1f} s")

    t = time.perf_counter()
    head, settings = fit_linear(xtr, ytr, classes=train.classes, feature_kind=kind, epochs=args.epochs,
                                batch_size=args.batch_size)
    m = evaluate_head(head, xte, yte)
    t_fast = time.perf_counter() - t
    print(f"fast linear probe: {t_fast:.1f} s, top-1 {m['top1']:.2f}, top-5 {m['top5']:.2f}, "
          f"lr {settings['lr']:g}, sweep {settings['lr_sweep']}")

    t = time.perf_counter()
    knn = knn_classify(xtr, ytr, xte, yte, k=20)
    print(f"k-NN k=20 on the same features: {time.perf_counter() - t:.1f} s, top-1 {knn['top1']:.2f}")

    if not args.no_sklearn:
        from sklearn.linear_model import LogisticRegression

        t = time.perf_counter()
        clf = LogisticRegression(max_iter=200).fit(xtr.numpy(), ytr)
        acc = 100.0 * float((clf.predict(xte.numpy()) == yte).mean())
        t_sk = time.perf_counter() - t
        print(f"scikit-learn LogisticRegression(lbfgs, 200 it): {t_sk:.1f} s, top-1 {acc:.2f} "
              f"({t_sk / t_fast:.1f}x the fast probe's time)")


if __name__ == "__main__":
    main()
