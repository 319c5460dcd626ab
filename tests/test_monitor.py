"""dinokit.eval.monitor.KNNMonitor: the k-NN callback scores what dinokit.embed + knn_classify score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dinokit.eval.knn import knn_classify
from dinokit.eval.monitor import KNNMonitor
from dinokit.training.config import TrainConfig
from dinokit.training.models import eval_preprocessing


class Pixels(torch.nn.Module):
    """A "backbone" whose features are its (preprocessed) input pixels (B, 3 * S * S)."""

    num_features = 3 * 28 * 28

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _cfg(**over: Any) -> TrainConfig:
    return TrainConfig().replace({"data.source": "fashion-mnist", **over})


def test_pixel_knn_through_the_monitor_equals_knn_on_raw_pixels(fmnist_small: dict[str, np.ndarray]) -> None:
    # 28 px crops, mean 0, std 1: the eval preprocessing must leave Fashion-MNIST pixels as they are
    # (no centre crop, no resize), so the monitor's score is the raw-pixel cosine k-NN
    cfg = _cfg(**{"data.global_crops_size": 28, "data.mean": [0, 0, 0], "data.std": [1, 1, 1],
                  "knn.train_source": "fashion-mnist@train#1000", "knn.val_source": "fashion-mnist@test#200"})
    backbone = Pixels().train()
    res = KNNMonitor.from_config(cfg)(backbone)
    x = fmnist_small
    want = knn_classify(torch.from_numpy(x["train_x"].reshape(1000, -1) / 255.0), x["train_y"],
                        torch.from_numpy(x["test_x"].reshape(200, -1) / 255.0), x["test_y"], k=20, T=0.07)
    assert res == {"top1": want["top1"], "top5": want["top5"], "k": 20, "temperature": 0.07, "n_train": 1000,
                   "n_val": 200}
    assert 70 < res["top1"] < 95  # pixels separate Fashion-MNIST classes well (84.6% on the full set)
    assert backbone.training  # the monitor puts the backbone back in training mode


def test_folders_skip_broken_images_and_align_classes(tmp_path: Path, fmnist_small: dict[str, np.ndarray]) -> None:
    from conftest import write_image_folder

    x, y = fmnist_small["train_x"], fmnist_small["train_y"]
    train = write_image_folder(tmp_path / "train", x[:100], y[:100])
    keep = np.isin(y[100:160], [0, 7])  # val holds 2 of the 10 classes: its labels must be re-indexed
    val = write_image_folder(tmp_path / "val", x[100:160][keep], y[100:160][keep])
    (next((val).iterdir()) / "broken.png").write_bytes(b"not an image")
    cfg = _cfg(**{"data.source": str(train), "knn.train_source": str(train), "knn.val_source": str(val),
                  "knn.k": 5})
    monitor = KNNMonitor.from_config(cfg)
    res = monitor(Pixels())
    # the broken file is skipped with its label; val's classes (sneaker, t-shirt: folders 0 and 1 of
    # val) are matched by name to train's (7 and 8): unaligned labels would score near 0%
    assert res["n_train"] == 100 and res["n_val"] == int(keep.sum())
    assert res["top1"] >= 80
    # a folder gets the default eval recipe at the crop size (resize + centre crop), Fashion-MNIST none
    assert "crop_pct" not in eval_preprocessing(cfg)
    assert eval_preprocessing(_cfg())["crop_pct"] == 1.0


def test_preprocessing_matches_what_export_records() -> None:
    from dinokit.publish import _training_preprocessing

    for cfg in (_cfg(), _cfg(**{"data.source": "/data/images", "data.global_crops_size": 96})):
        assert eval_preprocessing(cfg) == _training_preprocessing(cfg)


def test_from_config_needs_both_sources() -> None:
    with pytest.raises(ValueError, match=r"knn\.train_source and knn\.val_source"):
        KNNMonitor.from_config(TrainConfig())
