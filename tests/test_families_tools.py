"""Every dinokit tool on a DINOv2-reg and a DINOv3 model: embed, knn-eval, index, attention, pca,
export-onnx (onnxruntime against torch), plus the PCA picture's maths on features with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_families import official_v2, official_v3, ref_v2, ref_v3
from typer.testing import CliRunner

import dinokit
from dinokit.cli import app
from dinokit.pca import pca_rgb


def _run(args: list[str]) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def family_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("families")
    out = {}
    for name, sd in (("v2reg", official_v2(21, registers=4)), ("v3", official_v3(22)), ("v2", official_v2(23))):
        torch.save(sd, base / f"{name}.pth")
        out[name] = base / f"{name}.pth"
    return out


@pytest.fixture(scope="module")
def disc_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bright disc on a dark noisy background (224x224 RGB)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:224, :224]
    img = rng.integers(0, 60, (224, 224, 3)).astype(np.uint8)
    img[(yy - 112) ** 2 + (xx - 112) ** 2 < 60 ** 2] = (230, 180, 40)
    path = tmp_path_factory.mktemp("img") / "disc.png"
    Image.fromarray(img).save(path)
    return path


def test_pca_rgb_finds_the_foreground_and_colours_it() -> None:
    """Foreground patches (one direction) and background (another): the first component's threshold
    recovers the foreground block exactly, whatever the SVD sign, and the background is black."""
    g = torch.Generator().manual_seed(0)
    h, w, d = 8, 10, 32
    fg = torch.zeros(h, w, dtype=torch.bool)
    fg[2:6, 3:8] = True
    a, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    feats = torch.where(fg.reshape(-1, 1), a, b) * 3 + 0.3 * torch.randn(h * w, d, generator=g)
    for sign in (1, -1):
        rgb, mask, first = pca_rgb(sign * feats, h, w, threshold=0.5)
        assert (mask == fg.numpy()).all()
        assert rgb.shape == (h, w, 3) and (rgb[~mask] == 0).all()
        assert rgb[mask].max() == pytest.approx(1.0) and rgb[mask].min() == pytest.approx(0.0)
        assert first.min() == pytest.approx(0.0) and first.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="expected 8x9 patch features"):
        pca_rgb(feats, 8, 9)


@pytest.mark.parametrize("family", ["v2reg", "v3"])
def test_pca_cli_writes_picture_and_titled_figure(tmp_path: Path, family_files: dict[str, Path],
                                                  disc_image: Path, family: str) -> None:
    code, stdout, stderr = _run(["pca", str(disc_image), "--model", str(family_files[family]), "--out",
                                 str(tmp_path / "pca"), "--image-size", "112", "--json"])
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert [Path(r["image"]).name for r in rows] == ["disc.png"]
    pca = Image.open(rows[0]["pca"])
    p = 14 if family == "v2reg" else 16
    assert pca.size == (112 - 112 % p, 112 - 112 % p)
    fig = Image.open(rows[0]["figure"])
    assert fig.width > 2.5 * fig.height  # image, attention and PCA side by side


@pytest.mark.parametrize("family", ["v2reg", "v3"])
def test_attention_maps_skip_registers(family_files: dict[str, Path], disc_image: Path, family: str) -> None:
    model = dinokit.load(family_files[family])
    maps = dinokit.attention_maps(model, disc_image, image_size=(112, 160), threshold=0.6)
    p = 14 if family == "v2reg" else 16
    assert maps.patch_maps.shape == (2, 112 // p, 160 // p)  # patches only: the 4 registers are left out
    x, _ = __import__("dinokit.attention", fromlist=["prepare_image"]).prepare_image(model, disc_image, (112, 160))
    with torch.no_grad():
        full = dinokit.last_selfattention(model, x)
    assert np.allclose(maps.patch_maps.reshape(2, -1), full[0, :, 0, 5:].numpy(), atol=1e-6)
    assert full[0, :, 0, 5:].sum(-1).max() < 1.0  # registers hold part of the CLS attention


@pytest.mark.parametrize("family", ["v2reg", "v3"])
def test_embed_knn_and_index_cli(tmp_path: Path, family_files: dict[str, Path], fmnist_folders: dict[str, Path],
                                 family: str) -> None:
    model = str(family_files[family])
    size = "56" if family == "v2reg" else "64"
    code, _, stderr = _run(["embed", str(fmnist_folders["val"]), "--model", model, "--out", str(tmp_path / "f.npz"),
                            "--image-size", size, "--features", "registers", "--workers", "0"])
    assert code == 0, stderr
    with np.load(tmp_path / "f.npz") as z:
        assert z["features"].shape == (60, 4, 128)
    code, _, stderr = _run(["knn-eval", "--model", model, "--train", str(fmnist_folders["train"]), "--val",
                            str(fmnist_folders["val"]), "--k", "5", "--json-out", str(tmp_path / "knn.json"),
                            "--image-size", size, "--workers", "0", "--no-cache"])
    assert code == 0, stderr
    top1 = json.loads((tmp_path / "knn.json").read_text())
    assert "5" in json.dumps(top1)
    code, _, stderr = _run(["index", "build", str(fmnist_folders["val"]), "--model", model, "--out",
                            str(tmp_path / "idx"), "--kind", "flat", "--image-size", size, "--workers", "0"])
    assert code == 0, stderr
    query = sorted(fmnist_folders["val"].rglob("*.png"))[0]
    code, stdout, stderr = _run(["index", "search", str(tmp_path / "idx"), str(query), "-k", "3", "--json"])
    assert code == 0, stderr
    res = json.loads(stdout)
    first = res[0]["results"][0] if isinstance(res, list) else res["results"][0][0]
    assert Path(first["path"]).name == query.name and first["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(("family", "features"), [("v2reg", "cls"), ("v3", "patch"), ("v2", "cls")])
def test_export_onnx_matches_torch(tmp_path: Path, family_files: dict[str, Path], family: str, features: str) -> None:
    out = tmp_path / "m.onnx"
    code, stdout, stderr = _run(["export-onnx", str(family_files[family]), "--out", str(out), "--features", features,
                                 "--image-size", "112", "--json"])
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["max_abs_diff"] <= 1e-4
    assert info["dynamic_size"] is True  # offset resize and RoPE tables exported from tensor ops
    from dinokit.onnx import run_onnx

    sd = torch.load(family_files[family], weights_only=True)
    h, w = (144, 176) if family == "v3" else (126, 154)  # a size the export never saw
    x = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(5))
    got = run_onnx(out, x.numpy())
    ref = (ref_v3(sd, x)[:, 5:] if family == "v3" else
           ref_v2(sd, x, offset=0.0 if family == "v2reg" else 0.1, antialias=family == "v2reg")[:, 0])
    assert got.shape == tuple(ref.shape) and np.abs(got - ref.numpy()).max() <= 1e-4
