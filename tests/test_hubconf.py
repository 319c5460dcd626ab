"""hubconf.py: torch.hub.load(repo, "dino_vits16") with an official-name file in TORCH_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from conftest import make_tiny_vit
from test_hub import _same, official_v1_at, random_timm

import dinokit
from dinokit.models.registry import list_models

REPO = str(Path(__file__).resolve().parents[1])


def test_entry_points_follow_the_registry() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dinokit_hubconf", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ["torch", "timm"]
    public = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert public == sorted([e.name for e in list_models()] + ["dinokit_load"])
    import inspect

    sig = inspect.signature(hubconf.dino_vits16)
    assert sig.parameters["pretrained"].default is True
    assert any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def test_torch_hub_load_official_entry(tmp_path: Path) -> None:
    ref = random_timm("vit_small_patch16_224", seed=12, dynamic_img_size=True)
    ckpts = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), ckpts / "dino_deitsmall16_pretrain.pth")
    model = torch.hub.load(REPO, "dino_vits16", source="local", trust_repo=True)
    assert not model.training
    _same(model, ref, size=224, atol=1e-4)
    _same(model, official_v1_at(ref, 64), size=64, atol=1e-4)  # the official resize at other sizes
    random = torch.hub.load(REPO, "dino_vits16", source="local", pretrained=False, img_size=32, depth=1)
    assert random.num_features == 384 and random(torch.zeros(1, 3, 32, 32)).shape == (1, 384)


def test_torch_hub_dinokit_load_entry(tmp_path: Path) -> None:
    model = make_tiny_vit(seed=13)
    folder = dinokit.save(model, tmp_path / "m")
    loaded = torch.hub.load(REPO, "dinokit_load", str(folder), source="local", trust_repo=True)
    _same(loaded, model, atol=1e-6)


def test_torch_hub_dinov2_entry_takes_a_weights_file(tmp_path: Path) -> None:
    """The official DINOv2/v3 entry signature: pretrained=True, weights=<a local file>."""
    import inspect

    from test_families import official_v2, ref_v2

    sd = official_v2(50, registers=4)
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    model = torch.hub.load(REPO, "dinov2_vits14_reg", source="local", trust_repo=True,
                           weights=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))
    x = torch.randn(1, 3, 238, 322, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - ref_v2(sd, x, offset=0.0, antialias=True)[:, 0]).abs().max() < 1e-4
    entry = torch.hub.load(REPO, "dinov3_vits16", source="local", pretrained=False, depth=1)
    assert entry.global_pool == "token" and entry.num_features == 384
    import importlib.util

    spec = importlib.util.spec_from_file_location("dinokit_hubconf2", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    params = inspect.signature(hubconf.dinov3_vits16).parameters
    assert params["pretrained"].default is True and params["weights"].default is None
