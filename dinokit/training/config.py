"""Training configuration: frozen dataclasses that round-trip through JSON and YAML.

Defaults are the official DINO defaults (main_dino.py). A config is loaded from a YAML/JSON file,
optionally overridden with dotted ``key=value`` strings (``optim.lr=0.001``), validated (unknown keys
and bad values raise :class:`ConfigError` naming the dotted key) and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from dinokit.data.multicrop import MultiCropSpec


class ConfigError(ValueError):
    """A bad config: the message starts with the file (when known) and the dotted key."""


@dataclass(frozen=True)
class ModelConfig:
    """Backbone (a timm model) and DINO head."""

    arch: str = "vit_small_patch16_224"
    # extra timm.create_model kwargs, e.g. {patch_size: 4, embed_dim: 192, depth: 6, num_heads: 3, img_size: 32}
    model_args: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.1  # student only; the teacher has none
    out_dim: int = 65536
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    channels_last: bool = True  # memory format for convolutional backbones (ignored for ViTs)
    # timm's fused attention kernel; null = auto: off for bf16 on CPU (its CPU backward is slower than
    # plain matmuls: 1.4x faster steps measured for the Fashion-MNIST ViT), timm's default elsewhere
    fused_attn: bool | None = None


@dataclass(frozen=True)
class DataConfig(MultiCropSpec):
    """Where images come from, plus every multi-crop setting of :class:`MultiCropSpec`.

    The augmentation fields (crop sizes and scales, flip, jitter, grayscale, blur, solarize, mean/std,
    official defaults) are inherited so they are defined once; the recipe keys stay flat under data.
    """

    source: str = ""  # image folder (class subfolders or flat) or fashion-mnist[:PATH][@split][#N]
    limit: int | None = None  # use only the first N images (sorted order)
    # auto: batched on tensors for in-memory data (Fashion-MNIST), PIL in DataLoader workers for folders
    augment: Literal["auto", "pil", "tensor"] = "auto"
    num_workers: int = 2


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and the per-iteration schedules."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    batch_size_per_gpu: int = 64  # per process; lr scales with the total batch
    epochs: int = 100
    lr: float = 0.0005  # at total batch 256: lr = lr * batch_size_per_gpu * world_size / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-tensor gradient norm clip; 0 disables
    freeze_last_layer: int = 1  # epochs during which the head's last layer gets no update
    momentum_teacher: float = 0.996  # cosine to 1.0 over training


@dataclass(frozen=True)
class LossConfig:
    """DINO loss: teacher sharpening (with warm-up), student temperature, centering."""

    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9


@dataclass(frozen=True)
class KNNConfig:
    """Optional k-NN monitor: teacher features of a labeled train/val split, weighted vote."""

    train_source: str | None = None  # folder with class subfolders or fashion-mnist[...]@train#N
    val_source: str | None = None  # folder with class subfolders or fashion-mnist[...]@test
    every_epochs: int = 1  # also run at the end of training; 0 = only at the end
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; stored as JSON in every checkpoint and the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA; on CPU bf16 if faster
    compile: bool = False  # torch.compile the student and teacher
    num_threads: int | None = None  # torch intra-op threads on CPU (None: torch default)
    log_every: int = 10  # iterations per JSON-lines window record
    checkpoint_every: int = 1  # epochs between writes of checkpoint.pth (always written at the end)
    saveckp_freq: int = 20  # keep checkpoint_EPOCH.pth every N epochs; 0 = never
    max_iterations: int | None = None  # stop (with a checkpoint) after this many iterations in total
    max_minutes: float | None = None  # stop (with a checkpoint) after this much training wall time

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> TrainConfig:
        """Build and validate a config; unknown keys and bad values raise ConfigError naming the key."""
        cfg = _build(cls, data, "", source)
        _validate(cfg, source)
        return cfg

    @classmethod
    def from_json(cls, text: str, source: str = "") -> TrainConfig:
        return cls.from_dict(json.loads(text), source)

    def replace(self, overrides: list[str] | dict[str, Any]) -> TrainConfig:
        """A copy with dotted overrides applied (``["optim.lr=0.001"]`` or ``{"optim.lr": 0.001}``)."""
        data = self.to_dict()
        apply_overrides(data, overrides)
        return TrainConfig.from_dict(data, "--set")


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Load a YAML/JSON recipe (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = ""
    if path is not None:
        import yaml

        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        apply_overrides(data, overrides)
        source = source or "--set"
    return TrainConfig.from_dict(data, source)


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> None:
    """Set dotted keys in a nested dict in place; string values are parsed as YAML scalars/lists."""
    import yaml

    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item}: expected key=value (e.g. optim.lr=0.001)")
            key, _, text = item.partition("=")
            try:
                value = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError as e:
                raise ConfigError(f"--set {item}: cannot parse value ({str(e).splitlines()[0]})") from e
            items.append((key.strip(), value))
    for key, value in items:
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value


# ---------------------------------------------------------------- internals
def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    return obj


def _err(source: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{source + ': ' if source else ''}{key}: {msg}")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise _err(source, prefix or "<top>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(str(key), sorted(names), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise _err(source, f"{prefix}{key}", f"unknown key{hint}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key + ".", source)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is Literal:
        if value not in args:
            raise _err(source, key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _err(source, key, f"expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(a, v, key, source) for a, v in zip(args, value, strict=True))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _err(source, key, f"expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _err(source, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _err(source, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-6" (no dot) as a string: accept numeric strings
            try:
                return float(value)
            except ValueError:
                raise _err(source, key, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(source, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _err(source, key, f"expected a string, got {value!r}")
        return value
    raise _err(source, key, f"unsupported type {tp!r}")  # pragma: no cover - schema bug


def _validate(cfg: TrainConfig, source: str) -> None:
    """Value checks beyond types; each failure names its dotted key."""

    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise _err(source, key, msg)

    m, d, o, lo, k = cfg.model, cfg.data, cfg.optim, cfg.loss, cfg.knn
    check(bool(m.arch), "model.arch", "must not be empty")
    check(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", f"must be in [0, 1), got {m.drop_path_rate}")
    for name in ("out_dim", "head_nlayers", "head_hidden_dim", "head_bottleneck_dim"):
        check(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
    check(d.limit is None or d.limit >= 1, "data.limit", f"must be >= 1, got {d.limit}")
    for name in ("global_crops_size", "local_crops_size"):
        check(getattr(d, name) >= 1, f"data.{name}", f"must be >= 1, got {getattr(d, name)}")
    for name in ("global_crops_scale", "local_crops_scale", "blur_sigma"):
        lo_, hi_ = getattr(d, name)
        check(0 < lo_ <= hi_, f"data.{name}", f"must be 0 < low <= high, got {[lo_, hi_]}")
    for name in ("global_crops_scale", "local_crops_scale"):
        check(getattr(d, name)[1] <= 1.0, f"data.{name}", "scale is a fraction of the image area (<= 1)")
    check(d.local_crops_number >= 0, "data.local_crops_number", f"must be >= 0, got {d.local_crops_number}")
    for name in ("flip_prob", "color_jitter_prob", "grayscale_prob", "solarize_prob"):
        v = getattr(d, name)
        check(0.0 <= v <= 1.0, f"data.{name}", f"probability must be in [0, 1], got {v}")
    check(all(0.0 <= p <= 1.0 for p in d.blur_prob), "data.blur_prob", f"probabilities must be in [0, 1], got {list(d.blur_prob)}")
    for name in ("brightness", "contrast", "saturation"):
        check(getattr(d, name) >= 0, f"data.{name}", f"must be >= 0, got {getattr(d, name)}")
    check(0 <= d.hue <= 0.5, "data.hue", f"must be in [0, 0.5], got {d.hue}")
    check(all(s > 0 for s in d.std), "data.std", f"must be positive, got {list(d.std)}")
    check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    check(o.batch_size_per_gpu >= 1, "optim.batch_size_per_gpu", f"must be >= 1, got {o.batch_size_per_gpu}")
    check(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}")
    check(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs", f"must be in [0, optim.epochs], got {o.warmup_epochs}")
    check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    check(o.min_lr >= 0, "optim.min_lr", f"must be >= 0, got {o.min_lr}")
    check(o.weight_decay >= 0 and o.weight_decay_end >= 0, "optim.weight_decay", "must be >= 0")
    check(o.clip_grad >= 0, "optim.clip_grad", f"must be >= 0 (0 disables), got {o.clip_grad}")
    check(o.freeze_last_layer >= 0, "optim.freeze_last_layer", f"must be >= 0, got {o.freeze_last_layer}")
    check(0.0 <= o.momentum_teacher <= 1.0, "optim.momentum_teacher", f"must be in [0, 1], got {o.momentum_teacher}")
    for name in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
        check(getattr(lo, name) > 0, f"loss.{name}", f"must be > 0, got {getattr(lo, name)}")
    check(0 <= lo.warmup_teacher_temp_epochs <= o.epochs, "loss.warmup_teacher_temp_epochs",
          f"must be in [0, optim.epochs], got {lo.warmup_teacher_temp_epochs}")
    check(0.0 <= lo.center_momentum < 1.0, "loss.center_momentum", f"must be in [0, 1), got {lo.center_momentum}")
    check((k.train_source is None) == (k.val_source is None), "knn.val_source",
          "knn.train_source and knn.val_source must be given together")
    check(k.every_epochs >= 0, "knn.every_epochs", f"must be >= 0, got {k.every_epochs}")
    check(k.k >= 1, "knn.k", f"must be >= 1, got {k.k}")
    check(k.temperature > 0, "knn.temperature", f"must be > 0, got {k.temperature}")
    check(k.batch_size >= 1, "knn.batch_size", f"must be >= 1, got {k.batch_size}")
    check(cfg.precision in ("auto", "fp32", "bf16", "fp16"), "precision", f"bad value {cfg.precision!r}")
    check(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
          f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    check(cfg.num_threads is None or cfg.num_threads >= 1, "num_threads", f"must be >= 1, got {cfg.num_threads}")
    check(cfg.log_every >= 1, "log_every", f"must be >= 1, got {cfg.log_every}")
    check(cfg.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {cfg.checkpoint_every}")
    check(cfg.saveckp_freq >= 0, "saveckp_freq", f"must be >= 0, got {cfg.saveckp_freq}")
    check(cfg.max_iterations is None or cfg.max_iterations >= 1, "max_iterations", f"must be >= 1, got {cfg.max_iterations}")
    check(cfg.max_minutes is None or cfg.max_minutes > 0, "max_minutes", f"must be > 0, got {cfg.max_minutes}")


def require_source(cfg: TrainConfig) -> None:
    """Training needs data: raise ConfigError when ``data.source`` is empty."""
    if not cfg.data.source:
        raise ConfigError("data.source: required (an image folder or fashion-mnist[:PATH])")
