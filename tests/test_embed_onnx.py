"""dinokit.embed's runtime (torch or onnxruntime) and precision choices: onnxruntime features equal torch
fp32 ones (cosine >= 0.9999) for every feature kind, with a last batch smaller than the others; the
export is cached; bf16 is chosen automatically only where the CPU (or CUDA) runs it natively."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vit

from dinokit import embedding
from dinokit.embedding import EmbedOptions, embed, embed_precision

CPU = torch.device("cpu")


def _images(n: int = 10) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 40, 44, 3), dtype=np.uint8)


def _tiny_reg_vit() -> torch.nn.Module:
    """A tiny seeded ViT with 2 register tokens (for the "registers" kind)."""
    import timm

    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                             img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, reg_tokens=2).eval()


@pytest.mark.slow
@pytest.mark.parametrize("features", ["cls", "last2", "cls+avgpool", "patch", "registers"])
def test_onnx_runtime_matches_torch_fp32(features: str, one_thread: None) -> None:
    pytest.importorskip("onnxruntime")
    model = _tiny_reg_vit() if features == "registers" else make_tiny_vit()
    x = _images(9)  # batches of 4, 4, 1: the export's batch axis must be dynamic, down to 1
    common = {"batch_size": 4, "device": "cpu", "num_workers": 0, "image_size": 32, "features": features}
    want = embed(model, x, precision="fp32", **common)
    got = embed(model, x, runtime="onnx", **common)
    assert got.features.shape == want.features.shape and got.features.dtype == torch.float32
    assert got.paths == want.paths
    rows_got, rows_want = got.features.flatten(0, -2), want.features.flatten(0, -2)
    assert torch.nn.functional.cosine_similarity(rows_got, rows_want).min() >= 0.9999
    assert (got.features - want.features).abs().max() < 1e-4  # fp32 both: only summation order differs


@pytest.mark.slow
def test_onnx_export_is_cached_per_model_and_kind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   one_thread: None) -> None:
    pytest.importorskip("onnxruntime")
    import dinokit.onnx as onnx_mod

    model = make_tiny_vit()
    first = embed(model, _images(3), device="cpu", num_workers=0, image_size=32, runtime="onnx")
    path = onnx_mod.onnx_cache_path(model, "cls", 32)
    assert path.is_file() and path.parent.name == "onnx" and not list(path.parent.glob("*.tmp.onnx"))

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again although the cache holds the file")

    monkeypatch.setattr(onnx_mod, "export_onnx", no_export)
    again = embed(model, _images(3), device="cpu", num_workers=0, image_size=32, runtime="onnx")
    torch.testing.assert_close(again.features, first.features)
    # the sharded path runs the same cached file
    from PIL import Image

    for i, img in enumerate(_images(3)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    folder = embedding.embed_to_folder(model, tmp_path, tmp_path / "feats", device="cpu", num_workers=0,
                                       image_size=32, runtime="onnx", shard_size=2)
    assert folder["rows"] == 3 and len(folder["shards"]) == 2
    sharded = embedding.load_embeddings(tmp_path / "feats")
    torch.testing.assert_close(sharded.features, first.features, atol=1e-6, rtol=0)
    # other weights, another size or another kind: another file
    other = make_tiny_vit(seed=1)
    keys = {path, onnx_mod.onnx_cache_path(other, "cls", 32), onnx_mod.onnx_cache_path(model, "cls", 40),
            onnx_mod.onnx_cache_path(model, "patch", 32)}
    assert len(keys) == 4


def test_onnx_unsupported_kind_is_one_line_before_export(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    import dinokit.onnx as onnx_mod

    monkeypatch.setattr(onnx_mod, "export_onnx", lambda *a, **k: pytest.fail("exported an unsupported kind"))
    with pytest.raises(ValueError, match=r"^features='registers': the model has no register"):
        embed(make_tiny_vit(), _images(2), device="cpu", num_workers=0, runtime="onnx", features="registers")


def test_onnx_runtime_without_onnxruntime_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ImportError, match=r"^runtime 'onnx' needs onnxruntime: pip install onnxruntime$"):
        embed(make_tiny_vit(), _images(2), device="cpu", num_workers=0, runtime="onnx")


def test_precision_pinned_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("DINOKIT_EMBED_PRECISION", "fp32")
    assert embed_precision(CPU, "auto") == "fp32" and embed_precision(CPU, "bf16") == "bf16"
    monkeypatch.setenv("DINOKIT_EMBED_PRECISION", "fp16")
    with pytest.raises(ValueError, match=r"^\$DINOKIT_EMBED_PRECISION='fp16': expected fp32 or bf16$"):
        embed_precision(CPU, "auto")


def test_options_check_runtime_and_precision() -> None:
    assert EmbedOptions().runtime == "torch" and EmbedOptions().precision == "auto"
    with pytest.raises(ValueError, match="runtime='tensorrt'"):
        EmbedOptions(runtime="tensorrt")
    with pytest.raises(ValueError, match="precision='fp16'"):
        EmbedOptions(precision="fp16")
    with pytest.raises(ValueError, match="precision='bf16' needs runtime='torch'"):
        EmbedOptions(runtime="onnx", precision="bf16")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_never_picks_emulated_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.delenv("DINOKIT_EMBED_PRECISION")  # conftest pins it for the other tests
    monkeypatch.setattr(embedding, "cpu_has_native_bf16", lambda: native)
    assert embed_precision(CPU, "auto") == ("bf16" if native else "fp32")
    assert embed_precision(torch.device("cuda"), "auto") == "bf16"
    assert embed_precision(torch.device("mps"), "auto") == "fp32"
    assert embed_precision(CPU, "fp32") == "fp32" and embed_precision(CPU, "bf16") == "bf16"


def test_emulated_bf16_is_warned_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A sharded job asks for its precision twice (job description, forward): one warning, not two."""
    monkeypatch.setattr(embedding, "cpu_has_native_bf16", lambda: False)
    embedding._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="dinokit.embedding"):
        assert embed_precision(CPU, "bf16") == embed_precision(CPU, "bf16") == "bf16"
    assert [r.getMessage() for r in caplog.records] == [
        "precision bf16 on a CPU without native bf16: emulated, much slower than fp32"]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_what_embed_runs(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """bf16 autocast changes features a little (> 1e-4), fp32 not at all: embed follows the choice."""
    monkeypatch.delenv("DINOKIT_EMBED_PRECISION")
    monkeypatch.setattr(embedding, "cpu_has_native_bf16", lambda: native)
    model = make_tiny_vit()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fp32 = model(x)
    got = embed(model, x, device="cpu").features
    assert got.dtype == torch.float32
    diff = float((got - fp32).abs().max())
    assert (diff > 1e-4) if native else (diff < 1e-6)
    assert torch.nn.functional.cosine_similarity(got, fp32).min() > 0.999


def test_embed_help_explains_runtime() -> None:
    from typer.testing import CliRunner

    from dinokit.cli import app

    res = CliRunner().invoke(app, ["embed", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "--runtime" in res.output and "onnxruntime" in res.output and "--precision" in res.output


def test_cli_runtime_onnx_without_onnxruntime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from dinokit.cli import app

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    Image.fromarray(_images(1)[0]).save(tmp_path / "a.png")
    import dinokit.hub

    monkeypatch.setattr(dinokit.hub, "load", lambda name: make_tiny_vit())
    res = CliRunner().invoke(app, ["embed", str(tmp_path), "--model", "x", "--out", str(tmp_path / "f.npz"),
                                   "--runtime", "onnx", "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 1 and "needs onnxruntime" in res.output
