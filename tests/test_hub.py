"""dinokit.load for every checkpoint layout, dinokit.save and the timm / HF Hub round trips.

Every loaded model is compared with a timm model holding the same (seeded, random) weights.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import make_tiny_vit
from safetensors.torch import save_file

import dinokit
from dinokit.hub import CheckpointError
from dinokit.models.backbone import backbone_config
from dinokit.models.convert import timm_vit_to_hf


def _x(size: int = 32, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _same(a: torch.nn.Module, b: torch.nn.Module, size: int = 32, atol: float = 1e-5) -> None:
    x = _x(size)
    with torch.no_grad():
        fa, fb = a(x), b(x)
    assert fa.shape == fb.shape
    assert (fa - fb).abs().max().item() < atol


def random_timm(arch: str, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    """A timm backbone with seeded random weights, built without timm's (slow) init."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else torch.zeros_like(v, device="cpu"))
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    return model.eval()


def official_v1_at(ref: torch.nn.Module, size: int) -> torch.nn.Module:
    """``ref`` (a DINO v1 ViT trained at 224) as the official code runs it at ``size`` px: its 14x14
    position table resized bicubic, without antialias, with scale factor (n + 0.1) / 14, in a timm
    model built at ``size`` (so timm itself resizes nothing)."""
    p = ref.patch_embed.patch_size[0]
    n, m = size // p, ref.patch_embed.grid_size[0]
    pos = ref.pos_embed.detach()
    table = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    table = torch.nn.functional.interpolate(table, scale_factor=((n + 0.1) / m, (n + 0.1) / m), mode="bicubic")
    sd = dict(ref.state_dict())
    sd["pos_embed"] = torch.cat([pos[:, :1], table.permute(0, 2, 3, 1).reshape(1, n * n, -1)], dim=1)
    out = random_timm(ref.pretrained_cfg["architecture"], img_size=size, patch_size=p)
    out.load_state_dict(sd)
    return out.eval()


@pytest.fixture
def vit64() -> torch.nn.Module:
    """Tiny ViT with DINO's 64-d heads, so heads can be inferred from the width."""
    return make_tiny_vit(seed=1, embed_dim=128, num_heads=2)


def test_official_backbone_pth_vit_s16_matches_timm(tmp_path: Path) -> None:
    ref = random_timm("vit_small_patch16_224")
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(ref.state_dict(), path)  # official layout: plain timm ViT keys
    model = dinokit.load(path)
    assert not model.training and model.dinokit_name == str(path)
    assert model.pretrained_cfg["architecture"] == "vit_small_patch16_224"
    assert model.pretrained_cfg["crop_pct"] == 0.875 and model.pretrained_cfg["interpolation"] == "bicubic"
    _same(model, ref, size=224, atol=1e-4)
    # any image size: the position table resized as the official interpolate_pos_encoding does
    _same(model, official_v1_at(ref, 96), size=96, atol=1e-4)


def test_full_checkpoint_teacher_by_default_student_on_request(tmp_path: Path) -> None:
    teacher, student = make_tiny_vit(seed=2, embed_dim=64, num_heads=1), make_tiny_vit(seed=3, embed_dim=64, num_heads=1)
    head = {"head.mlp.0.weight": torch.zeros(16, 64), "head.last_layer.weight_g": torch.ones(8, 1),
            "head.last_layer.weight_v": torch.ones(8, 16)}
    ck = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
        "student": {f"module.{k}": v for k, v in
                    {**{f"backbone.{k}": v for k, v in student.state_dict().items()}, **head}.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 5,
        "args": argparse.Namespace(arch="vit_small", patch_size=8, out_dim=65536, lr=0.0005),
        "dino_loss": {"center": torch.zeros(1, 8)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ck, path)
    with pytest.raises(pickle.UnpicklingError):  # the reason the Namespace must be allow-listed
        torch.load(path, weights_only=True)
    _same(dinokit.load(path), teacher)
    _same(dinokit.load(path, which="student"), student)


def test_dinokit_checkpoint_config_beats_inference(tmp_path: Path) -> None:
    model = make_tiny_vit(seed=4)  # 3 heads of 16 dims: heads cannot be read off the tensors
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    ck = {"teacher": sd, "student": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1,
          "backbone_config": json.dumps(backbone_config(model)), "config": json.dumps({"epochs": 2})}
    torch.save(ck, tmp_path / "ck.pth")
    _same(dinokit.load(tmp_path / "ck.pth"), model)
    del ck["backbone_config"]
    torch.save(ck, tmp_path / "ck2.pth")
    with pytest.raises(CheckpointError, match="cannot infer the number of heads"):
        dinokit.load(tmp_path / "ck2.pth")
    _same(dinokit.load(tmp_path / "ck2.pth", model_args={"num_heads": 3}), model)


def test_safetensors_file_alone_and_with_config(tmp_path: Path, vit64: torch.nn.Module) -> None:
    save_file(vit64.state_dict(), str(tmp_path / "weights.safetensors"))
    _same(dinokit.load(tmp_path / "weights.safetensors"), vit64)
    other = make_tiny_vit(seed=5)  # 16-d heads: needs the config.json beside the file
    d = tmp_path / "withcfg"
    d.mkdir()
    save_file(other.state_dict(), str(d / "weights.safetensors"))
    (d / "config.json").write_text(json.dumps(backbone_config(other)))
    _same(dinokit.load(d / "weights.safetensors"), other)


def test_save_is_a_timm_local_dir(tmp_path: Path) -> None:
    model = make_tiny_vit(seed=6)
    folder = dinokit.save(model, tmp_path / "out" / "tiny-dino", metrics={"knn_top1": 81.25},
                          dataset="fashion-mnist", extra_config={"dinokit_recipe": "fmnist"})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-dino"]  # no temp folder left behind
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 0
    assert cfg["dinokit_recipe"] == "fmnist" and cfg["dinokit"]["metrics"] == {"knn_top1": 81.25}
    via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    _same(via_timm, model, atol=1e-6)
    _same(dinokit.load(folder), model, atol=1e-6)
    _same(dinokit.load(folder), model, size=48, atol=1e-5)
    text = (folder / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "timm" and front["pipeline_tag"] == "image-feature-extraction"
    assert {"dino", "self-supervised", "image-feature-extraction", "dinokit"} <= set(front["tags"])
    result = front["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "name": "knn_top1", "value": 81.25}
    assert result["dataset"]["name"] == "fashion-mnist"
    # saving again into a folder with other files replaces ours and keeps theirs
    (folder / "notes.txt").write_text("keep me")
    dinokit.save(make_tiny_vit(seed=7), folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    _same(dinokit.load(folder), make_tiny_vit(seed=7))
    # a timm folder with the legacy pickle weights file
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(folder / "config.json", legacy / "config.json")
    torch.save(make_tiny_vit(seed=7).state_dict(), legacy / "pytorch_model.bin")
    _same(dinokit.load(legacy), make_tiny_vit(seed=7))


def _put_in_hf_cache(hf_home: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay files out exactly like huggingface_hub's cache: snapshots/<commit>/ + refs/main."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hf_hub_repo_id_from_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    model = make_tiny_vit(seed=8)
    folder = dinokit.save(model, tmp_path / "export")
    hf_home = Path(__import__("os").environ["HF_HOME"])
    _put_in_hf_cache(hf_home, "dinokit-test/tiny-dino",
                     {n: folder / n for n in ("config.json", "model.safetensors", "README.md")})
    loaded = dinokit.load("dinokit-test/tiny-dino")
    _same(loaded, model, atol=1e-6)
    assert loaded.dinokit_name == "dinokit-test/tiny-dino"
    _same(dinokit.load("hf-hub:dinokit-test/tiny-dino"), model, atol=1e-6)
    # plain timm reads the same cache entry (its constants were frozen at import: point them here)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    via_timm = timm.create_model("hf-hub:dinokit-test/tiny-dino", pretrained=True).eval()
    _same(via_timm, model, atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"dinokit-test/missing: no model\.safetensors .*offline"):
        dinokit.load("dinokit-test/missing")


def test_hf_transformers_vit_layout(tmp_path: Path, vit64: torch.nn.Module) -> None:
    model = make_tiny_vit(seed=9)  # width 48, 3 heads: the HF config gives the head count
    hf_cfg = {"model_type": "vit", "architectures": ["ViTModel"], "hidden_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 3, "intermediate_size": 192, "patch_size": 8, "image_size": 32,
              "num_channels": 3, "qkv_bias": True, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    d = tmp_path / "dino-vit-hf"
    d.mkdir()
    save_file(timm_vit_to_hf(model.state_dict()), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(hf_cfg))
    _same(dinokit.load(d), model)
    # ViTForImageClassification-style file ("vit." prefix, a classifier), no config: shapes suffice
    sd = {f"vit.{k}": v for k, v in timm_vit_to_hf(vit64.state_dict()).items()}
    sd["classifier.weight"], sd["classifier.bias"] = torch.zeros(10, 128), torch.zeros(10)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    _same(dinokit.load(tmp_path / "pytorch_model.bin"), vit64)
    # and from the HF cache, as facebook/dino-* repos are laid out
    _put_in_hf_cache(Path(__import__("os").environ["HF_HOME"]), "facebook-test/dino-tiny",
                     {"config.json": d / "config.json", "model.safetensors": d / "model.safetensors"})
    _same(dinokit.load("facebook-test/dino-tiny"), model)


def test_strict_load_names_missing_and_unexpected_keys(tmp_path: Path, vit64: torch.nn.Module) -> None:
    sd = dict(vit64.state_dict())
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["blocks.1.attn.extra"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        dinokit.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: does not fit")
    assert "missing keys: blocks.1.mlp.fc2.bias" in msg and "unexpected keys: blocks.1.attn.extra" in msg


def test_resnet50_from_torchvision_keys(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None)
    torch.save(tv.state_dict(), tmp_path / "dino_resnet50_pretrain.pth")
    model = dinokit.load(tmp_path / "dino_resnet50_pretrain.pth")
    assert model.pretrained_cfg["architecture"] == "resnet50" and model.num_features == 2048
    tv.fc = torch.nn.Identity()
    _same(model, tv.eval(), size=64, atol=1e-4)


def test_bad_sources_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a registry model"):
        dinokit.load(tmp_path / "nothing.pth")
    with pytest.raises(FileNotFoundError, match=r"^models/typo\.pth: not a registry model"):
        dinokit.load("models/typo.pth")  # looks like org/name, but it is a missing file
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pth: cannot be read as a checkpoint with weights_only"):
        dinokit.load(tmp_path / "garbage.pth")
    torch.save({"w": torch.zeros(1), "p": Path("/etc")}, tmp_path / "unsafe.pth")  # a class not allow-listed
    with pytest.raises(CheckpointError, match=r"unsafe\.pth: cannot be read .*weights_only=True"):
        dinokit.load(tmp_path / "unsafe.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        dinokit.load(tmp_path / "empty")


def test_cli_convert_and_models(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dinokit.cli import app

    model = make_tiny_vit(seed=14, embed_dim=64, num_heads=1)
    ck = {"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
          "student": {f"module.backbone.{k}": v + 1 for k, v in model.state_dict().items()},
          "args": argparse.Namespace(arch="vit_tiny"), "epoch": 0}
    torch.save(ck, tmp_path / "checkpoint.pth")
    runner = CliRunner()
    res = runner.invoke(app, ["convert", str(tmp_path / "checkpoint.pth"), "--out", str(tmp_path / "conv")])
    assert res.exit_code == 0, res.output
    via_timm = timm.create_model(f"local-dir:{tmp_path / 'conv'}", pretrained=True).eval()
    _same(via_timm, model)
    res = runner.invoke(app, ["convert", str(tmp_path / "nothing.pth"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "nothing.pth" in res.output
    res = runner.invoke(app, ["models", "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows][:2] == ["dino_vits16", "dino_vits8"] and rows[0]["cached"] is False
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "dino_resnet50" in res.stdout
