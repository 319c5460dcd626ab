"""The registry of official DINO weights, and loading them through torch.hub's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_hub import _same, official_v1_at, random_timm

import dinokit
from dinokit.hub import CheckpointError
from dinokit.models.registry import WeightsNotFoundError, get_entry, list_models

# From DESIGN.md / the DINO paper: (arch, official file, k-NN, linear)
OFFICIAL = {
    "dino_vits16": ("vit_small_patch16_224", "dino_deitsmall16_pretrain", 74.5, 77.0),
    "dino_vits8": ("vit_small_patch8_224", "dino_deitsmall8_pretrain", 78.3, 79.7),
    "dino_vitb16": ("vit_base_patch16_224", "dino_vitbase16_pretrain", 76.1, 78.2),
    "dino_vitb8": ("vit_base_patch8_224", "dino_vitbase8_pretrain", 77.4, 80.1),
    "dino_resnet50": ("resnet50", "dino_resnet50_pretrain", 67.5, 75.3),
}


def _checkpoints() -> Path:
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"


def test_registry_holds_the_official_weights() -> None:
    entries = [e for e in list_models() if e.family == "dino"]  # DINO v1; v2/v3: test_families_registry
    assert [e.name for e in entries] == list(OFFICIAL)
    assert dinokit.list_models() == list_models()
    for e in entries:
        arch, stem, knn, linear = OFFICIAL[e.name]
        assert e.arch == arch and (e.knn_top1, e.linear_top1) == (knn, linear)
        assert e.url == f"https://dl.fbaipublicfiles.com/dino/{stem}/{stem}.pth"
        assert e.file_name == f"{stem}.pth"
        assert e.input_size == (3, 224, 224) and e.crop_pct == 0.875 and e.interpolation == "bicubic"
        assert e.mean == (0.485, 0.456, 0.406) and e.std == (0.229, 0.224, 0.225)
        assert e.cache_path() == _checkpoints() / e.file_name
        if e.arch.startswith("vit"):
            assert e.timm_hub_id == f"timm/{arch}.dino"
    with pytest.raises(KeyError, match="dino_vitl16: not a registry model; known: dino_vits16"):
        get_entry("dino_vitl16")
    with pytest.raises(AttributeError):  # frozen
        entries[0].url = "x"  # type: ignore[misc]


def test_registry_load_reads_the_torch_hub_cache(tmp_path: Path) -> None:
    ref = random_timm("vit_small_patch16_224", seed=11, dynamic_img_size=True)
    _checkpoints().mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), _checkpoints() / "dino_deitsmall16_pretrain.pth")
    model = dinokit.load("dino_vits16")
    assert model.dinokit_name == "dino_vits16" and model.pretrained_cfg["crop_pct"] == 0.875
    _same(model, ref, size=224, atol=1e-4)
    _same(model, official_v1_at(ref, 64), size=64, atol=1e-4)  # the official resize at other sizes


def test_registry_offline_error_says_where_to_put_the_file() -> None:
    target = _checkpoints() / "dino_vitbase8_pretrain.pth"
    with pytest.raises(WeightsNotFoundError) as info:
        dinokit.load("dino_vitb8")
    msg = str(info.value)
    assert msg.startswith(f"{target}: ") and "\n" not in msg
    assert "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_registry_file_checked_against_the_architecture() -> None:
    # a ViT-S/16 state dict under the ViT-S/8 name: every patch-8 shape must be refused
    wrong = random_timm("vit_small_patch16_224", img_size=32)
    _checkpoints().mkdir(parents=True, exist_ok=True)
    torch.save(wrong.state_dict(), _checkpoints() / "dino_deitsmall8_pretrain.pth")
    with pytest.raises(CheckpointError, match=r"dino_deitsmall8_pretrain\.pth: does not fit vit_small_patch8_224: "
                                              r"shape mismatch .*pos_embed \(1, 5, 384\) != \(1, 785, 384\)"):
        dinokit.load("dino_vits8")
