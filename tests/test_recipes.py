"""recipes/*.yaml: each parses into a valid TrainConfig with the settings it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinokit.training.config import TrainConfig, load_config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
NAMES = ["dino_vits16_in1k", "dino_vitb16_in1k", "dino_vits16_in1k_fast", "fashion_mnist_cpu"]


@pytest.mark.parametrize("name", NAMES)
def test_recipe_parses_and_round_trips(name: str) -> None:
    cfg = load_config(RECIPES / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig)
    assert cfg.data.source, "a recipe names its data"
    assert TrainConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("name", ["dino_vits16_in1k", "dino_vitb16_in1k", "dino_vits16_in1k_fast"])
def test_imagenet_recipes_use_official_values(name: str) -> None:
    c = load_config(RECIPES / f"{name}.yaml")
    o, lo, d, m = c.optim, c.loss, c.data, c.model
    assert (o.optimizer, o.lr, o.min_lr, o.warmup_epochs) == ("adamw", 0.0005, 1e-6, 10)
    assert (o.weight_decay, o.weight_decay_end, o.clip_grad, o.freeze_last_layer) == (0.04, 0.4, 3.0, 1)
    assert (o.batch_size_per_gpu, o.momentum_teacher) == (64, 0.996)
    assert (m.out_dim, m.drop_path_rate, m.head_hidden_dim, m.head_bottleneck_dim) == (65536, 0.1, 2048, 256)
    assert (d.global_crops_size, d.global_crops_scale) == (224, (0.4, 1.0))
    assert (d.local_crops_size, d.local_crops_scale) == (96, (0.05, 0.4))
    assert (lo.student_temp, lo.center_momentum, lo.warmup_teacher_temp) == (0.1, 0.9, 0.04)
    assert d.blur_prob == (1.0, 0.1, 0.5) and d.solarize_prob == 0.2


def test_official_and_fast_recipes_differ_where_the_readme_says() -> None:
    s16 = load_config(RECIPES / "dino_vits16_in1k.yaml")
    b16 = load_config(RECIPES / "dino_vitb16_in1k.yaml")
    fast = load_config(RECIPES / "dino_vits16_in1k_fast.yaml")
    assert s16.model.arch == "vit_small_patch16_224" and b16.model.arch == "vit_base_patch16_224"
    assert (s16.optim.epochs, s16.loss.teacher_temp, s16.loss.warmup_teacher_temp_epochs) == (100, 0.04, 0)
    assert (s16.model.norm_last_layer, s16.data.local_crops_number) == (True, 8)
    assert (fast.optim.epochs, fast.loss.teacher_temp, fast.loss.warmup_teacher_temp_epochs) == (300, 0.07, 30)
    assert (fast.model.norm_last_layer, fast.data.local_crops_number) == (False, 10)
    assert fast.model.arch == s16.model.arch


def test_every_setting_is_explained() -> None:
    """Recipes say why: every leaf setting of the CPU recipe carries a comment on its line."""
    text = (RECIPES / "fashion_mnist_cpu.yaml").read_text().splitlines()
    bare = [ln for ln in text if ln.strip() and not ln.lstrip().startswith("#")
            and not ln.rstrip().endswith(":") and "#" not in ln]
    assert bare == []


def test_fashion_mnist_recipe_fits_its_budget_and_builds() -> None:
    import torch

    from dinokit.training.loop import build_models

    c = load_config(RECIPES / "fashion_mnist_cpu.yaml")
    assert c.data.source == "fashion-mnist@train" and c.data.limit is None  # all 60k training images
    assert c.max_minutes == 30 and c.num_threads == 2 and c.device in ("auto", "cpu")
    assert c.optim.freeze_last_layer < c.optim.epochs or c.optim.freeze_last_layer == 0
    torch.manual_seed(0)
    student, teacher = build_models(c)
    crops = [torch.randn(2, 3, c.data.global_crops_size, c.data.global_crops_size)] * 2 + \
        [torch.randn(2, 3, c.data.local_crops_size, c.data.local_crops_size)] * c.data.local_crops_number
    with torch.no_grad():
        out = student(crops)
    assert out.shape == (2 * (2 + c.data.local_crops_number), c.model.out_dim)
    assert teacher.backbone.num_features == c.model.model_args["channels"][-1]
