"""dinokit against tensors made by the official DINO / DINOv2 / DINOv3 code (tests/data/official,
written by tests/data/official/make_reference.py; provenance.json names the code commits).

Each file holds an official state dict (``sd.*``) of a tiny model with randomized layer scale, norms
and biases, and the official outputs (``out.*``) for seeded inputs: the hub forward (normalized CLS)
at the trained size and at a size that needs interpolation, the normalized patch and register /
storage tokens, and rows of the last block's attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dinokit

DATA = Path(__file__).parent / "data" / "official"
NAMES = json.loads((DATA / "provenance.json").read_text())["models"]


@pytest.mark.parametrize("name", sorted(NAMES))
def test_matches_the_official_code(tmp_path: Path, name: str) -> None:
    tensors = load_file(str(DATA / f"{name}.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    torch.save(sd, tmp_path / "official.pth")  # the official file layout
    args = {} if "convnext" in name else {"num_heads": 1}
    model = dinokit.load(tmp_path / "official.pth", model_args=args)
    checked = 0
    for key, want in tensors.items():
        if not key.startswith("out."):
            continue
        kind, size = key[4:].split("_")
        h, w = (int(s) for s in size.split("x"))
        i = 0 if (h, w) == (224, 224) else 1
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            if kind == "attn":
                got = dinokit.last_selfattention(model, x)[:, :, :8]
            else:
                got = dinokit.compute_features(model, x, {"cls": "cls", "patch": "patch", "registers": "registers"}[kind])
        assert got.shape == want.shape, key
        diff = (got - want).abs().max().item()
        assert diff <= 1e-4, f"{name} {key}: max abs diff {diff:.2e}"
        checked += 1
    assert checked == len(NAMES[name]["outputs"])
