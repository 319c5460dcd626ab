"""Linear probe: the hand-written SGD against torch autograd + torch.optim.SGD, accuracy, head files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dinokit
from dinokit.data.labeled import resolve_labeled
from dinokit.eval.linear import (
    LinearHead,
    _train_heads,
    classify,
    default_features,
    evaluate_head,
    fit_linear,
    linear_probe,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n: int, c: int, d: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(c, d)) * 1.5
    y = rng.integers(0, c, n)
    return (centers[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


def test_public_name() -> None:
    assert dinokit.linear_probe is linear_probe


def test_parallel_heads_equal_torch_sgd_per_lr() -> None:
    # Full batch, so the data order does not matter; every head must follow torch.optim.SGD
    # (momentum 0.9, no weight decay) with its own lr and a per-iteration cosine to 0.
    x, y = _blobs(64, 3, 5, seed=0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lrs, epochs, seed = [0.05, 0.5], 6, 3
    w, b = _train_heads(xt, yt, 3, lrs, epochs, batch_size=64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    torch.randperm(64, generator=g)  # the data shuffle drawn before the init
    w0 = torch.randn(len(lrs) * 3, 5, generator=g) * 0.01
    for h, lr in enumerate(lrs):
        lin = torch.nn.Linear(5, 3)
        with torch.no_grad():
            lin.weight.copy_(w0[h * 3:(h + 1) * 3])
            lin.bias.zero_()
        opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9, weight_decay=0)
        for step in range(epochs):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / epochs))
            opt.zero_grad()
            F.cross_entropy(lin(xt), yt).backward()
            opt.step()
        torch.testing.assert_close(w[h], lin.weight.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b[h], lin.bias.detach(), atol=1e-5, rtol=1e-4)


def test_fit_linear_separates_synthetic_features() -> None:
    x, y = _blobs(1500, 6, 24, seed=1)
    xv, yv = _blobs(600, 6, 24, seed=2)
    head, settings = fit_linear(x, y, epochs=15, batch_size=128, classes=list("abcdef"))
    m = evaluate_head(head, torch.from_numpy(xv), yv)
    assert m["top1"] > 90.0  # chance is 16.7%
    assert m["top5"] >= m["top1"]
    assert settings["lr"] in {v * 128 / 256 for v in (0.001, 0.01, 0.1, 1.0)}
    assert set(settings["lr_sweep"]) == {"0.0005", "0.005", "0.05", "0.5"}
    assert sum(c for row in m["confusion"] for c in row) == 600
    assert len(m["per_class"]) == 6 and min(m["per_class"]) > 70


def test_fit_linear_bad_labels() -> None:
    with pytest.raises(ValueError, match="labels must be in"):
        fit_linear(np.zeros((4, 3)), np.array([0, 1, 2, 5]), num_classes=3)
    with pytest.raises(ValueError, match="2 labels"):
        fit_linear(np.zeros((4, 3)), np.array([0, 1]))


def test_head_save_load_round_trip(tmp_path) -> None:
    head = LinearHead(7, 3, ["cat", "dog", "fish"], "last4", {"lr": 0.1})
    path = head.save(tmp_path / "h" / "head.safetensors")
    again = LinearHead.load(path)
    assert again.classes == ["cat", "dog", "fish"] and again.features == "last4" and again.info == {"lr": 0.1}
    x = torch.randn(5, 7)
    torch.testing.assert_close(again(x), head(x))
    probs, idx = again.predict(x, topk=2)
    assert torch.equal(idx[:, 0], head(x).argmax(1))
    assert probs.shape == (5, 2) and torch.all(probs[:, 0] >= probs[:, 1])
    assert float(head.linear.weight.detach().std()) == pytest.approx(0.01, rel=0.5)  # official init
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        LinearHead.load(bad)


def test_default_features_follow_the_official_choice(tiny_vit: torch.nn.Module) -> None:
    from dinokit.models.backbone import create_backbone

    assert default_features(tiny_vit) == "last2"  # 2 blocks: as many of the last 4 as exist
    small = create_backbone("vit_small_patch16_224", depth=4, img_size=32)
    assert default_features(small) == "last4"
    base = create_backbone("vit_base_patch16_224", depth=1, img_size=32)
    assert default_features(base) == "cls+avgpool"
    assert default_features(torch.nn.Linear(3, 3)) == "cls"


def test_linear_probe_fast_and_official_on_fashion_mnist(tiny_vit: torch.nn.Module, fmnist_root) -> None:
    train = resolve_labeled(f"fashion-mnist:{fmnist_root}#300")
    val = resolve_labeled(f"fashion-mnist:{fmnist_root}#100", default_split="test")
    fast = linear_probe(tiny_vit, train, val, fast=True, num_workers=0, device="cpu")
    assert fast.settings["mode"] == "fast" and fast.head.features == "last2"
    assert fast.head.in_dim == 2 * 48 and fast.head.classes[0] == "T-shirt/top"
    assert fast.top1 > 20.0  # random-init tiny ViT, 300 images: still far above chance (10%)
    assert fast.settings["num_train"] == 300 and fast.settings["num_val"] == 100

    small = resolve_labeled(f"fashion-mnist:{fmnist_root}#48")
    off = linear_probe(tiny_vit, small, val, fast=False, epochs=2, batch_size=16, num_workers=0, device="cpu",
                       features="cls")
    assert off.settings["mode"] == "official" and off.settings["effective_lr"] == pytest.approx(0.001 * 16 / 256)
    assert len(off.history) == 2 and all(np.isfinite(h["loss"]) for h in off.history)
    assert off.head.in_dim == 48 and 0.0 <= off.top1 <= 100.0

    images = val.images[:5]
    rows, skipped = classify(tiny_vit, fast.head, images, topk=3, num_workers=0)
    assert len(rows) == 5 and not skipped
    assert all(r["label"] in fast.head.classes and len(r["topk"]) == 3 for r in rows)


def test_head_from_official_linear_weights(tmp_path) -> None:
    from dinokit.eval.linear import head_from_official

    torch.manual_seed(0)
    d, c = 6, 4
    official = torch.nn.Linear(2 * d, c)
    # Official layout: DDP prefix, inside "state_dict", with optimizer / epoch entries beside it.
    ckpt = {"epoch": 100, "best_acc": 78.2,
            "state_dict": {f"module.linear.{k}": v for k, v in official.state_dict().items()}}
    path = tmp_path / "dino_vitbase16_linearweights.pth"
    torch.save(ckpt, path)
    head = head_from_official(path, features="cls+avgpool")
    cls, avg = torch.randn(3, d), torch.randn(3, d)
    interleaved = torch.stack([cls, avg], dim=-1).reshape(3, -1)  # the official feature order
    torch.testing.assert_close(head(torch.cat([cls, avg], dim=1)), official(interleaved))
    last4 = head_from_official(ckpt, features="last4")
    x = torch.randn(3, 2 * d)
    torch.testing.assert_close(last4(x), official(x))
    with pytest.raises(ValueError, match=r"linear\.weight"):
        head_from_official({"state_dict": {"fc.weight": torch.zeros(1)}})
