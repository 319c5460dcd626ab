"""TrainConfig: official defaults, JSON/YAML round trip, dotted overrides, rejection naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinokit.training.config import ConfigError, TrainConfig, load_config


def test_defaults_are_the_official_dino_ones() -> None:
    c = TrainConfig()
    assert (c.optim.lr, c.optim.min_lr, c.optim.warmup_epochs, c.optim.epochs) == (0.0005, 1e-6, 10, 100)
    assert (c.optim.weight_decay, c.optim.weight_decay_end, c.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert (c.optim.freeze_last_layer, c.optim.momentum_teacher, c.optim.batch_size_per_gpu) == (1, 0.996, 64)
    assert (c.loss.warmup_teacher_temp, c.loss.teacher_temp, c.loss.warmup_teacher_temp_epochs) == (0.04, 0.04, 0)
    assert (c.loss.student_temp, c.loss.center_momentum) == (0.1, 0.9)
    assert (c.model.out_dim, c.model.norm_last_layer, c.model.use_bn_in_head, c.model.drop_path_rate) == (
        65536, True, False, 0.1)
    assert (c.data.global_crops_scale, c.data.local_crops_scale, c.data.local_crops_number) == (
        (0.4, 1.0), (0.05, 0.4), 8)
    assert (c.data.global_crops_size, c.data.local_crops_size) == (224, 96)
    assert c.data.blur_prob == (1.0, 0.1, 0.5) and c.data.solarize_prob == 0.2
    assert (c.data.brightness, c.data.contrast, c.data.saturation, c.data.hue) == (0.4, 0.4, 0.2, 0.1)
    assert c.seed == 0


def test_json_round_trip_and_yaml_file(tmp_path: Path) -> None:
    c = TrainConfig().replace({"model.model_args": {"patch_size": 4, "depth": 2}, "data.source": "fashion-mnist"})
    again = TrainConfig.from_json(c.to_json())
    assert again == c and isinstance(again.data.mean, tuple)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  arch: vit_tiny_patch16_224\n  out_dim: 512\noptim:\n  epochs: 3\n"
                      "  warmup_epochs: 1\ndata:\n  source: fashion-mnist#100\n  local_crops_scale: [0.1, 0.5]\n")
    c = load_config(recipe, ["optim.lr=2e-3", "max_minutes=30", "data.augment=tensor"])
    assert (c.model.arch, c.model.out_dim, c.optim.epochs, c.optim.lr) == ("vit_tiny_patch16_224", 512, 3, 0.002)
    assert c.data.local_crops_scale == (0.1, 0.5) and c.max_minutes == 30.0 and c.data.augment == "tensor"
    assert c.optim.min_lr == 1e-6  # untouched keys keep defaults
    assert json.loads(c.to_json())["data"]["local_crops_scale"] == [0.1, 0.5]


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        ("optim:\n  lrr: 0.1\n", [], "optim.lrr: unknown key (did you mean optim.lr?)"),
        ("modle:\n  arch: x\n", [], "modle: unknown key"),
        ("optim:\n  epochs: ten\n", [], "optim.epochs: expected an integer"),
        ("data:\n  flip_prob: 1.5\n", [], "data.flip_prob: probability must be in [0, 1]"),
        ("data:\n  global_crops_scale: [0.9, 0.4]\n", [], "data.global_crops_scale: must be 0 < low <= high"),
        ("precision: fp8\n", [], "precision: must be one of"),
        ("", ["loss.teacher_temp=-1"], "loss.teacher_temp: must be > 0"),
        ("", ["optim.warmup_epochs=200"], "optim.warmup_epochs: must be in [0, optim.epochs]"),
        ("", ["knn.train_source=fashion-mnist"], "knn.val_source: knn.train_source and knn.val_source"),
        ("", ["model.norm_last_layer=maybe"], "model.norm_last_layer: expected true or false"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, overrides: list[str], needle: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(recipe, overrides)
    assert needle in str(err.value)
    assert str(err.value).startswith(str(recipe))


def test_override_syntax_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number"):
        load_config(None, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match=r"optim\.lr is not a section"):
        load_config(None, ["optim.lr=1", "optim.lr.x=1"])
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- bounded parsing (issue 16)
BILLION_LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["model:", "  model_args:", "    x: *i", "seed: *i"])


def test_billion_laughs_recipe_is_a_fast_one_line_error(tmp_path: Path) -> None:
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(BILLION_LAUGHS)  # 9**9 = 387 million strings once expanded
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    msg = str(err.value)
    assert msg.startswith(f"{recipe}: expands to more than") and "\n" not in msg and len(msg) < 200


def test_wrong_type_error_shows_a_shortened_value(tmp_path: Path) -> None:
    big = {"k": list(range(100_000))}
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"seed": big}, "r.yaml")
    msg = str(err.value)
    assert msg.startswith("r.yaml: seed: expected an integer, got {'k': [0, 1, 2, 3, 4, 5, ...]}") and len(msg) < 120
    with pytest.raises(ConfigError, match=r"^--set: device: must be auto.*got 'xxxxx.*\.\.\.") as err:
        TrainConfig().replace({"device": "x" * 1_000_000})
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + "- \n" for i in range(1, 300)),
                                  "{a: " * 3000 + "1" + "}" * 3000])
def test_deep_nesting_is_an_error_not_a_recursion_error(tmp_path: Path, text: str) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=r"deep.yaml: (nested deeper than 64 levels|not valid YAML)"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"^--set model.model_args: (nested deeper|not valid YAML)"):
        load_config(None, ["model.model_args=" + text])


def test_size_limits_come_before_parsing(tmp_path: Path) -> None:
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("seed: 0\n" + "#" * (2 << 20))
    with pytest.raises(ConfigError, match=r"huge.yaml: \d+ bytes, over the 262144-byte limit for a recipe"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="over the 262144 limit"):
        load_config(None, ["data.source=" + "x" * (2 << 20)])
    with pytest.raises(ConfigError, match=r"^ckpt: nested deeper than 64 levels"):
        TrainConfig.from_json("[" * 100_000 + "]" * 100_000, "ckpt")


@pytest.mark.parametrize(("text", "message"), [
    ("[1, 2]", "r.yaml: expected a mapping at the top level, got list [1, 2]"),
    ("model: [a]", "r.yaml: model: expected a mapping, got list ['a']"),
    ("model:\n  model_args: patch_size=4", "r.yaml: model.model_args: expected a mapping, got 'patch_size=4'"),
    ("data:\n  mean: 0.5", "r.yaml: data.mean: expected a list of 3 numbers, got 0.5"),
    ("? [a, b]\n: 1", "r.yaml: not valid YAML"),
    ("x: !!python/object/apply:os.system ['echo hi']", "r.yaml: not valid YAML"),
    ("\udcff", None),
])
def test_structural_errors_name_file_and_key(tmp_path: Path, text: str, message: str | None) -> None:
    recipe = tmp_path / "r.yaml"
    if message is None:
        recipe.write_bytes(b"seed: \xff\xfe")
        message = "r.yaml: not UTF-8 text"
    else:
        recipe.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value).replace(str(tmp_path) + "/", "").startswith(message)
