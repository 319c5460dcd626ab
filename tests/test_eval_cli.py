"""knn-eval, linear-eval and classify on a small folder data set; the feature cache; corrupt images."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import dinokit
from dinokit.cli import app
from dinokit.data.labeled import align_classes, resolve_labeled
from dinokit.embedding import embed
from dinokit.eval.cache import embed_labeled
from dinokit.eval.knn import knn_classify_multi
from dinokit.models.backbone import create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A seeded tiny ViT (32 px, patch 8, depth 2) saved with dinokit.save."""
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    dinokit.save(model, folder)
    return folder, model


@pytest.fixture(scope="module")
def data_with_corrupt(tmp_path_factory: pytest.TempPathFactory, fmnist_folders: dict[str, Path]) -> dict[str, Path]:
    """The fmnist_folders train set plus one corrupt PNG in the Bag class."""
    root = tmp_path_factory.mktemp("corrupt")
    train = Path(shutil.copytree(fmnist_folders["train"], root / "train"))
    (train / "Bag" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return {"train": train, "val": fmnist_folders["val"]}


def _run(args: list[str]) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def test_knn_eval_matches_the_api_and_reuses_the_cache(tiny_folder, data_with_corrupt, tmp_path, monkeypatch):
    folder, model = tiny_folder
    d = data_with_corrupt
    out = tmp_path / "res" / "knn.json"
    code, stdout, stderr = _run(["knn-eval", "--model", str(folder), "--train", str(d["train"]), "--val",
                                 str(d["val"]), "--k", "5", "20", "--json-out", str(out), "--workers", "0"])
    assert code == 0, stderr
    data = json.loads(out.read_text())
    # The corrupt file is skipped and reported, not fatal.
    assert data["num_train"] == 200 and data["num_val"] == 60
    assert [Path(p).name for p, _ in data["skipped"]] == ["zz_broken.png"]
    assert "zz_broken.png" in stderr and "skipped 1" in stderr
    # Same numbers as the Python API on features from dinokit.embed (official eval preprocessing).
    tr = resolve_labeled(d["train"])
    va = align_classes(tr, resolve_labeled(d["val"]))
    keep = [i for i, p in enumerate(tr.images) if p.name != "zz_broken.png"]
    ftr = embed(model, [tr.images[i] for i in keep], num_workers=0).features
    fva = embed(model, va.images, num_workers=0).features
    ref = knn_classify_multi(ftr, tr.labels[keep], fva, va.labels, ks=(5, 20), num_classes=10)
    for k in (5, 20):
        assert data["results"][str(k)]["top1"] == pytest.approx(ref[k]["top1"])
        assert data["results"][str(k)]["top5"] == pytest.approx(ref[k]["top5"])
        assert list(data["results"][str(k)]["per_class"].values()) == pytest.approx(ref[k]["per_class"])
    assert data["classes"] == sorted(p.name for p in d["train"].iterdir())
    for name in ("knn.confusion.png", "knn.per_class.png"):
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1" in stdout and "Trouser" in stdout

    # Second run, other k: the features must come from the cache (embedding would fail).
    def no_embed(*a, **k):
        raise AssertionError("embed called although the features are cached")

    monkeypatch.setattr(importlib.import_module("dinokit.embedding"), "embed", no_embed)
    code, stdout, stderr = _run(["knn-eval", "--model", str(folder), "--train", str(d["train"]), "--val",
                                 str(d["val"]), "--k", "10", "--json-out", str(tmp_path / "b.json"), "--workers", "0"])
    assert code == 0, stderr
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["skipped"] == data["skipped"]  # the cache remembers skipped files too
    assert again["results"]["10"]["top1"] == pytest.approx(
        knn_classify_multi(ftr, tr.labels[keep], fva, va.labels, ks=(10,))[10]["top1"])
    # --no-cache does not read it.
    # (the CLI's error handler turns the test's AssertionError into one error line)
    code, _, stderr = _run(["knn-eval", "--model", str(folder), "--train", str(d["train"]), "--val", str(d["val"]),
                            "--k", "10", "--no-cache", "--workers", "0"])
    assert code == 1 and "AssertionError: embed called" in stderr


def test_cache_key_follows_data_and_model(tiny_folder, fmnist_root, monkeypatch):
    _, model = tiny_folder
    data = resolve_labeled(f"fashion-mnist:{fmnist_root}#40")
    x1, y1, _ = embed_labeled(model, data, num_workers=0)
    calls = []
    embed_mod = importlib.import_module("dinokit.embedding")

    orig = embed_mod.embed

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(embed_mod, "embed", counting)
    x2, y2, _ = embed_labeled(model, data, num_workers=0)
    assert not calls and torch.equal(x1, x2) and np.array_equal(y1, y2)
    embed_labeled(model, resolve_labeled(f"fashion-mnist:{fmnist_root}#41"), num_workers=0)  # other data
    assert len(calls) == 1
    other = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    embed_labeled(other, data, num_workers=0)  # other weights
    assert len(calls) == 2
    embed_labeled(model, data, num_workers=0, features="last2")  # other feature kind
    assert len(calls) == 3


def test_linear_eval_and_classify(tiny_folder, data_with_corrupt, tmp_path):
    folder, _ = tiny_folder
    d = data_with_corrupt
    out = tmp_path / "probe"
    code, stdout, stderr = _run(["linear-eval", "--model", str(folder), "--train", str(d["train"]), "--val",
                                 str(d["val"]), "--fast", "--epochs", "10", "--out", str(out), "--workers", "0"])
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert metrics["settings"]["num_train"] == 200 and metrics["settings"]["mode"] == "fast"
    assert "zz_broken.png" in stderr
    for name in ("head.safetensors", "confusion.png", "per_class.png"):
        assert (out / name).is_file()
    code, stdout, stderr = _run(["classify", "--model", str(folder), "--head", str(out / "head.safetensors"),
                                 str(d["val"] / "Trouser"), str(d["train"] / "Bag" / "zz_broken.png"), "--json"])
    assert code == 0, stderr
    res = json.loads(stdout)
    n_trouser = len(list((d["val"] / "Trouser").iterdir()))
    assert len(res["predictions"]) == n_trouser and len(res["skipped"]) == 1
    assert all(p["label"] in metrics["classes"] and 0 < p["prob"] <= 1 for p in res["predictions"])


def test_cli_errors_are_one_line(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    code, _, stderr = _run(["knn-eval", "--model", str(folder), "--train", str(tmp_path / "nope"), "--val",
                            str(tmp_path), "--workers", "0"])
    assert code == 1 and "nope" in stderr and "Traceback" not in stderr
    code, _, stderr = _run(["knn-eval", "--model", str(folder), "--train", "x", "--val", "y", "--k", "ten"])
    assert code == 1 and "--k" in stderr
    code, _, stderr = _run(["classify", "--model", str(folder), "--head", str(tmp_path / "h.safetensors"),
                            str(tmp_path)])
    assert code == 1
    for cmd in ("knn-eval", "linear-eval", "classify"):
        code, stdout, _ = _run([cmd, "--help"])
        assert code == 0 and "Example:" in stdout


def test_knn_eval_on_fashion_mnist_specs_uses_the_test_split_for_val(tiny_folder, fmnist_root, tmp_path):
    from dinokit.data.fashion_mnist import load_fashion_mnist

    folder, model = tiny_folder
    out = tmp_path / "f.json"
    code, _, stderr = _run(["knn-eval", "--model", str(folder), "--train", f"fashion-mnist:{fmnist_root}#120",
                            "--val", f"fashion-mnist:{fmnist_root}#40", "--k", "3,7", "--backend", "faiss",
                            "--json-out", str(out), "--workers", "0"])
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert data["num_train"] == 120 and data["num_val"] == 40 and data["classes"][0] == "T-shirt/top"
    xtr, ytr = load_fashion_mnist("train", fmnist_root, limit=120)
    xte, yte = load_fashion_mnist("test", fmnist_root, limit=40)
    ref = knn_classify_multi(embed(model, xtr, num_workers=0).features, ytr,
                             embed(model, xte, num_workers=0).features, yte, ks=(3, 7), num_classes=10)
    for k in (3, 7):
        assert data["results"][str(k)]["top1"] == pytest.approx(ref[k]["top1"])
