"""DINOHead: official structure, init, weight-normalised last layer, official weight_g/weight_v loading."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from dinokit.models.head import DINOHead, MultiCropWrapper, convert_official_head_state_dict


def test_structure_init_and_frozen_g() -> None:
    torch.manual_seed(0)
    h = DINOHead(48, 1000, hidden_dim=512, bottleneck_dim=64)
    keys = list(h.state_dict())
    assert keys == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
                    "last_layer.weight_g", "last_layer.weight_v"]
    assert isinstance(h.mlp[1], nn.GELU) and h.mlp[0].weight.shape == (512, 48) and h.mlp[4].weight.shape == (64, 512)
    w = h.mlp[2].weight
    # trunc_normal_(std=.02) with the official absolute bounds (-2, 2): effectively a plain normal(0, .02)
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert h.mlp[0].bias.abs().sum() == 0
    g = h.state_dict()["last_layer.weight_g"]
    assert g.shape == (1000, 1) and torch.all(g == 1)
    trainable = {n for n, p in h.named_parameters() if p.requires_grad}
    assert "last_layer.parametrizations.weight.original0" not in trainable
    # g = 1: each prototype row of the effective weight is a unit vector
    assert torch.allclose(h.last_layer.weight.norm(dim=1), torch.ones(1000), atol=1e-5)
    h2 = DINOHead(48, 10, norm_last_layer=False, use_bn=True, nlayers=2, hidden_dim=32, bottleneck_dim=8)
    assert isinstance(h2.mlp[1], nn.BatchNorm1d) and len(h2.mlp) == 4
    assert h2.last_layer.parametrizations.weight.original0.requires_grad
    assert isinstance(DINOHead(8, 4, nlayers=1, bottleneck_dim=6).mlp, nn.Linear)


def test_official_weight_g_weight_v_state_dict_loads_and_matches_by_hand() -> None:
    torch.manual_seed(1)
    in_dim, hid, bot, out = 6, 10, 4, 7
    sd = {
        "mlp.0.weight": torch.randn(hid, in_dim), "mlp.0.bias": torch.randn(hid),
        "mlp.2.weight": torch.randn(hid, hid), "mlp.2.bias": torch.randn(hid),
        "mlp.4.weight": torch.randn(bot, hid), "mlp.4.bias": torch.randn(bot),
        "last_layer.weight_g": torch.rand(out, 1) + 0.5,  # a trained g (norm_last_layer False)
        "last_layer.weight_v": torch.randn(out, bot),
    }
    h = DINOHead(in_dim, out, norm_last_layer=False, hidden_dim=hid, bottleneck_dim=bot)
    h.load_state_dict(sd, strict=True)
    x = torch.randn(3, in_dim)
    # independent computation of the official forward
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    z = gelu(x @ sd["mlp.0.weight"].T + sd["mlp.0.bias"])
    z = gelu(z @ sd["mlp.2.weight"].T + sd["mlp.2.bias"])
    z = z @ sd["mlp.4.weight"].T + sd["mlp.4.bias"]
    z = z / z.norm(dim=1, keepdim=True)
    v = sd["last_layer.weight_v"]
    w = sd["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    expected = z @ w.T
    assert torch.allclose(h(x), expected, atol=1e-5)
    # round trip: state_dict gives back the official names and values
    again = h.state_dict()
    assert torch.equal(again["last_layer.weight_g"], sd["last_layer.weight_g"])
    assert torch.equal(again["last_layer.weight_v"], sd["last_layer.weight_v"])
    conv = convert_official_head_state_dict({"head." + k: v for k, v in sd.items()}, prefix="head.")
    assert "head.last_layer.parametrizations.weight.original0" in conv and "head.mlp.0.weight" in conv


def test_matches_torch_legacy_weight_norm_module() -> None:
    """The same numbers as a head built with the old nn.utils.weight_norm (what official checkpoints used)."""
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy = nn.utils.weight_norm(nn.Linear(4, 9, bias=False))
    ours = DINOHead(5, 9, nlayers=1, bottleneck_dim=4)
    sd = ours.state_dict()
    sd["last_layer.weight_g"] = legacy.weight_g.detach().clone()
    sd["last_layer.weight_v"] = legacy.weight_v.detach().clone()
    ours.load_state_dict(sd, strict=True)
    z = torch.randn(2, 4)
    z = z / z.norm(dim=1, keepdim=True)
    assert torch.allclose(ours.last_layer(z), legacy(z), atol=1e-6)


def test_multicrop_wrapper_batches_same_resolution_crops() -> None:
    calls: list[tuple[int, ...]] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    head = nn.Identity()
    wrapper = MultiCropWrapper(Spy(), head)
    crops = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)] + [torch.randn(2, 3, 4, 4) for _ in range(3)]
    out = wrapper(crops)
    assert calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    assert torch.allclose(out, torch.cat([c.mean(dim=(2, 3)) for c in crops]))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_gradients_reach_v_and_only_trainable_g(norm_last_layer: bool) -> None:
    h = DINOHead(8, 5, norm_last_layer=norm_last_layer, hidden_dim=16, bottleneck_dim=4)
    h(torch.randn(3, 8)).square().sum().backward()
    p = h.last_layer.parametrizations.weight
    assert p.original1.grad is not None
    assert (p.original0.grad is not None) == (not norm_last_layer)
