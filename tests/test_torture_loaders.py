"""Torture suite, loaders: random and mutated bytes fed to every loader dinokit has.

The contract each test asserts: a clear one-line error of an expected type (ValueError or OSError
subclasses: CheckpointError, ConfigError, ImageError, FileNotFoundError, ...) naming the file, or a
correct result. Anything else (KeyError, AttributeError, RecursionError, a traceback-only
TypeError, a hang, code run from a pickle) fails. Hypothesis runs derandomized, so the examples are
the same on every run.
"""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

EXPECTED = (ValueError, OSError)  # every dinokit error for bad input is one of these
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def clear_error_or_result(fn: Callable[[], Any], path: Path) -> Any:
    """Run a loader: return its result, or None after checking the error is one clear line."""
    try:
        return fn()
    except EXPECTED as e:
        msg = str(e)
        assert "\n" not in msg, f"multi-line error: {msg[:300]!r}"
        assert len(msg) < 1500, f"error of {len(msg)} characters"
        assert path.name in msg, f"error does not name {path.name}: {msg[:300]!r}"
        return None


# ------------------------------------------------------------------ mutations of seed files
_OPS = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("zero"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("ff"), st.floats(0, 1), st.integers(1, 8)),
)


def mutate(data: bytes, ops: list[tuple[str, float, Any]]) -> bytes:
    """Apply byte-level mutations at relative positions (so they hit headers and bodies alike)."""
    buf = bytearray(data)
    for op, where, arg in ops:
        i = min(int(where * len(buf)), max(len(buf) - 1, 0))
        if op == "flip" and buf:
            buf[i] ^= arg or 1
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = arg
        elif op == "zero":
            buf[i:i + arg] = bytes(len(buf[i:i + arg]))
        elif op == "ff":
            buf[i:i + arg] = b"\xff" * len(buf[i:i + arg])
    return bytes(buf)


MUTATIONS = st.lists(_OPS, min_size=1, max_size=4)
RANDOM = st.binary(min_size=0, max_size=512)


# ------------------------------------------------------------------ seeds
def _tiny_state_dict() -> dict[str, torch.Tensor]:
    from conftest import make_tiny_vit

    return {k: v.clone() for k, v in make_tiny_vit(depth=1, embed_dim=64, num_heads=1).state_dict().items()}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Valid files of each kind: the mutations start from these."""
    from conftest import make_tiny_vit
    from PIL import Image
    from safetensors.torch import save

    import dinokit

    sd = _tiny_state_dict()
    out: dict[str, bytes] = {}
    buf = io.BytesIO()
    torch.save(sd, buf)
    out["pth"] = buf.getvalue()
    full = {"student": {f"module.backbone.{k}": v for k, v in sd.items()},
            "teacher": {f"backbone.{k}": v for k, v in sd.items()}, "optimizer": {}, "epoch": 3}
    buf = io.BytesIO()
    torch.save(full, buf)
    out["full"] = buf.getvalue()
    out["safetensors"] = save(sd, metadata={"format": "pt"})
    folder = tmp_path_factory.mktemp("seed") / "m"
    dinokit.save(make_tiny_vit(depth=1, embed_dim=64, num_heads=1), folder)
    out["config"] = (folder / "config.json").read_bytes()
    out["weights"] = (folder / "model.safetensors").read_bytes()
    out["recipe"] = Path(__file__).parents[1].joinpath("recipes", "fashion_mnist_vit_cpu.yaml").read_bytes()
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for fmt in ("png", "jpeg", "gif", "bmp", "webp", "tiff"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _check_model(model: Any) -> None:
    assert isinstance(model, torch.nn.Module) and not model.training
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 64)


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("kind", ["pth", "full", "safetensors"])
@SETTINGS
@given(ops=MUTATIONS)
def test_mutated_checkpoints(seeds: dict[str, bytes], tmp_path: Path, kind: str, ops: list) -> None:
    import dinokit

    path = _write(tmp_path, "ckpt.safetensors" if kind == "safetensors" else f"{kind}.pth",
                  mutate(seeds[kind], ops))
    model = clear_error_or_result(lambda: dinokit.load(path), path)
    if model is not None:
        _check_model(model)


@SETTINGS
@given(data=RANDOM)
def test_random_bytes_as_checkpoints(tmp_path: Path, data: bytes) -> None:
    import dinokit

    for name in ("x.pth", "x.safetensors"):
        path = _write(tmp_path, name, data)
        assert clear_error_or_result(lambda p=path: dinokit.load(p), path) is None


_VALUES = st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
                    st.builds(torch.zeros, st.integers(0, 3)), st.just({"a": torch.zeros(2)}),
                    st.sampled_from(['{"architecture": 5}', "[1]", '{"model_args": "x"}', "{", "null"]))


@SETTINGS
@given(key=st.sampled_from(["student", "teacher", "optimizer", "epoch", "config", "backbone_config",
                            "teacher.backbone.pos_embed", "state_dict"]), value=_VALUES)
def test_full_checkpoint_fields_of_any_type(tmp_path: Path, key: str, value: Any) -> None:
    import dinokit

    sd = _tiny_state_dict()
    ckpt: dict[str, Any] = {"student": {f"backbone.{k}": v for k, v in sd.items()},
                            "teacher": {f"backbone.{k}": v for k, v in sd.items()}, "optimizer": {}, "epoch": 1}
    section, _, name = key.partition(".")
    if name:
        ckpt[section][name] = value
    else:
        ckpt[key] = value
    path = tmp_path / "full.pth"
    torch.save(ckpt, path)
    model = clear_error_or_result(lambda: dinokit.load(path), path)
    if model is not None:
        _check_model(model)


# ------------------------------------------------------------------ config.json folders
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                     max_leaves=12)
_CONFIG_KEYS = ["architecture", "model_args", "pretrained_cfg", "model_type", "num_attention_heads", "dinokit"]


def _model_folder(tmp_path: Path, seeds: dict[str, bytes], config: bytes) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(seeds["weights"])
    (folder / "config.json").write_bytes(config)
    return folder


@SETTINGS
@given(ops=MUTATIONS)
def test_mutated_config_json(seeds: dict[str, bytes], tmp_path: Path, ops: list) -> None:
    import dinokit

    folder = _model_folder(tmp_path, seeds, mutate(seeds["config"], ops))
    model = clear_error_or_result(lambda: dinokit.load(folder), folder / "config.json")
    if model is not None:
        _check_model(model)


@SETTINGS
@given(key=st.sampled_from([*_CONFIG_KEYS, "pretrained_cfg.mean", "pretrained_cfg.input_size",
                            "pretrained_cfg.crop_pct", "model_args.embed_dim"]),
       value=_JSON)
def test_config_json_fields_of_any_type(seeds: dict[str, bytes], tmp_path: Path, key: str, value: Any) -> None:
    import dinokit

    config = json.loads(seeds["config"])
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    folder = _model_folder(tmp_path, seeds, json.dumps(config).encode())
    model = clear_error_or_result(lambda: dinokit.load(folder), folder)
    if model is not None:
        _check_model(model)


@pytest.mark.parametrize(("config", "message"), [
    ([1, 2], "config.json: expected a mapping, got list [1, 2]"),
    ({"architecture": "vit_tiny_patch16_224", "model_args": "depth=1"},
     "config.json: model_args: expected a mapping, got string 'depth=1'"),
    ({"architecture": ["vit"]}, "config.json: architecture: expected a string, got list ['vit']"),
    ({"architecture": "vit_tiny_patch16_224", "pretrained_cfg": {"mean": "0.5"}},
     "config.json: pretrained_cfg.mean: expected a list, got string '0.5'"),
    ({"model_type": "vit", "num_attention_heads": "2"},
     "config.json: num_attention_heads: expected an integer, got string '2'"),
    ("[" * 10000 + "]" * 10000, "config.json: nested deeper than 64 levels"),
])
def test_tampered_config_json_names_file_and_key(seeds: dict[str, bytes], tmp_path: Path, config: Any,
                                                 message: str) -> None:
    import dinokit
    from dinokit.hub import CheckpointError

    text = config if isinstance(config, str) else json.dumps(config)
    folder = _model_folder(tmp_path, seeds, text.encode())
    with pytest.raises(CheckpointError) as err:
        dinokit.load(folder)
    assert str(err.value) == f"{folder / message}"


# ------------------------------------------------------------------ recipes
@SETTINGS
@given(ops=MUTATIONS)
def test_mutated_recipes(seeds: dict[str, bytes], tmp_path: Path, ops: list) -> None:
    from dinokit.training.config import TrainConfig, load_config

    path = _write(tmp_path, "recipe.yaml", mutate(seeds["recipe"], ops))
    cfg = clear_error_or_result(lambda: load_config(path), path)
    if cfg is not None:
        assert isinstance(cfg, TrainConfig) and TrainConfig.from_json(cfg.to_json()) == cfg


@SETTINGS
@given(text=st.text(max_size=200) | st.text(alphabet="[]{}:-&*!|>, \n'\"ab1", max_size=300)
       | st.binary(max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape")))  # argv of any bytes
def test_random_recipe_text_and_set_values(tmp_path: Path, text: str) -> None:
    from dinokit.training.config import load_config

    path = _write(tmp_path, "recipe.yaml", text.encode("utf-8", "surrogatepass"))
    clear_error_or_result(lambda: load_config(path), path)
    try:
        load_config(None, [f"model.model_args={text}"])
    except EXPECTED as e:
        assert "\n" not in str(e) and str(e).startswith("--set")


# ------------------------------------------------------------------ images
@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif", "bmp", "webp", "tiff"])
@SETTINGS
@given(ops=MUTATIONS)
def test_mutated_images(seeds: dict[str, bytes], tmp_path: Path, fmt: str, ops: list) -> None:
    from dinokit.data.images import ImageError, load_rgb

    path = _write(tmp_path, f"img.{fmt}", mutate(seeds[fmt], ops))
    try:
        img = load_rgb(path, max_pixels=1 << 22)
    except ImageError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path))
        return
    assert img.mode == "RGB" and img.width * img.height <= 1 << 22


# ------------------------------------------------------------------ feature files (embed --out)
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@SETTINGS
@given(ops=MUTATIONS)
def test_mutated_feature_files(tmp_path: Path, suffix: str, ops: list) -> None:
    from dinokit.embedding import Embeddings, load_embeddings

    good = tmp_path / f"good{suffix}"
    Embeddings(torch.arange(12.0).reshape(3, 4), ["a.png", "b.png", "c.png"], [], {"model": "x"}).save(good)
    path = _write(tmp_path, f"f{suffix}", mutate(good.read_bytes(), ops))
    emb = clear_error_or_result(lambda: load_embeddings(path), path)
    if emb is not None:
        assert emb.features.ndim >= 1 and len(emb.paths) == len(emb.features)


# ------------------------------------------------------------------ index folders
@pytest.mark.skipif(importlib.util.find_spec("dinokit.retrieval.store") is None,
                    reason="the index store (dinokit/retrieval/store.py) has not landed on this branch")
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 100), ops=MUTATIONS)
def test_mutated_index_folders(tmp_path: Path, which: int, ops: list) -> None:  # pragma: no cover - store
    import shutil

    from dinokit import Index

    src = tmp_path / "src"
    if not src.exists():
        feats = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=1)
        Index.from_features(feats, [f"{i}.png" for i in range(20)]).save(src)
    folder = tmp_path / "idx"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(src, folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    target = files[which % len(files)]
    target.write_bytes(mutate(target.read_bytes(), ops))
    index = clear_error_or_result(lambda: Index.load(folder), folder)
    if index is not None:  # the store reads segments lazily: a search must fail as clearly
        res = clear_error_or_result(lambda: index.search(torch.ones(1, 8), k=3), folder)
        if res is not None:
            assert res.ids.shape == (1, 3)


# ------------------------------------------------------------------ run folders (export's metadata)
@pytest.mark.parametrize(("file", "key", "value"), [
    ("summary.json", "world_size", "two"), ("summary.json", "", [1, 2]), ("summary.json", "device", 3),
    ("checkpoint.pth", "iteration", "4"), ("checkpoint.pth", "config", 5), ("checkpoint.pth", "config", "{"),
    ("checkpoint.pth", "backbone_config", "[1]"),
])
def test_tampered_run_folder_metadata_names_file_and_key(tmp_path: Path, file: str, key: str, value: Any) -> None:
    from conftest import make_tiny_vit

    from dinokit.models.backbone import backbone_config
    from dinokit.publish import export
    from dinokit.training.config import TrainConfig

    model = make_tiny_vit(depth=1, embed_dim=64, num_heads=1)
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state: dict[str, Any] = {"student": sd, "teacher": sd, "optimizer": {}, "epoch": 1, "iteration": 4,
                             "config": TrainConfig().to_json(), "backbone_config": json.dumps(backbone_config(model))}
    summary: Any = {"world_size": 1, "device": "cpu"}
    if file == "summary.json":
        summary = value if not key else {**summary, key: value}
    else:
        state[key] = value
    torch.save(state, tmp_path / "checkpoint.pth")
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError) as err:
        export(tmp_path, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / file)) and (key in msg)
    assert not (tmp_path / "out").exists()  # nothing half written
