"""Key converters and architecture inference from tensor shapes."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from dinokit.models.convert import (
    CheckpointError,
    check_state_dict,
    hf_vit_to_timm,
    infer_config,
    timm_vit_to_hf,
    unwrap_checkpoint,
)


def _shapes(arch: str, **kwargs: object) -> dict[str, torch.Tensor]:
    """State dict of a timm model built on the meta device (shapes only, instant)."""
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).state_dict()


def test_hf_vit_keys_fuse_qkv_in_query_key_value_order() -> None:
    g = torch.Generator().manual_seed(0)
    d = 8
    q, k, v = (torch.randn(d, d, generator=g) for _ in range(3))
    qb, kb, vb = (torch.randn(d, generator=g) for _ in range(3))
    hf = {
        "embeddings.cls_token": torch.zeros(1, 1, d),
        "embeddings.position_embeddings": torch.zeros(1, 5, d),
        "embeddings.patch_embeddings.projection.weight": torch.zeros(d, 3, 4, 4),
        "embeddings.patch_embeddings.projection.bias": torch.zeros(d),
        "encoder.layer.0.attention.attention.query.weight": q,
        "encoder.layer.0.attention.attention.key.weight": k,
        "encoder.layer.0.attention.attention.value.weight": v,
        "encoder.layer.0.attention.attention.query.bias": qb,
        "encoder.layer.0.attention.attention.key.bias": kb,
        "encoder.layer.0.attention.attention.value.bias": vb,
        "encoder.layer.0.attention.output.dense.weight": torch.ones(d, d),
        "encoder.layer.0.intermediate.dense.weight": torch.full((4 * d, d), 2.0),
        "encoder.layer.0.output.dense.weight": torch.full((d, 4 * d), 3.0),
        "encoder.layer.0.layernorm_before.weight": torch.full((d,), 4.0),
        "encoder.layer.0.layernorm_after.weight": torch.full((d,), 5.0),
        "layernorm.weight": torch.full((d,), 6.0),
        "pooler.dense.weight": torch.zeros(d, d),
        "embeddings.mask_token": torch.zeros(1, 1, d),
    }
    t = hf_vit_to_timm(hf)
    qkv = t["blocks.0.attn.qkv.weight"]
    assert qkv.shape == (3 * d, d)
    assert torch.equal(qkv[:d], q) and torch.equal(qkv[d:2 * d], k) and torch.equal(qkv[2 * d:], v)
    assert torch.equal(t["blocks.0.attn.qkv.bias"], torch.cat([qb, kb, vb]))
    assert t["blocks.0.attn.proj.weight"].sum() == d * d
    assert t["blocks.0.mlp.fc1.weight"][0, 0] == 2 and t["blocks.0.mlp.fc2.weight"][0, 0] == 3
    assert t["blocks.0.norm1.weight"][0] == 4 and t["blocks.0.norm2.weight"][0] == 5 and t["norm.weight"][0] == 6
    assert "pos_embed" in t and "patch_embed.proj.weight" in t and not any(k.startswith("pooler") for k in t)
    back = timm_vit_to_hf(t)
    assert set(back) == set(hf) - {"pooler.dense.weight", "embeddings.mask_token"}
    assert all(torch.equal(back[k], hf[k]) for k in back)


@pytest.mark.parametrize(("arch", "kwargs", "expect_arch", "expect_args"), [
    ("vit_small_patch16_224", {}, "vit_small_patch16_224", {}),
    ("vit_small_patch8_224", {}, "vit_small_patch8_224", {}),
    ("vit_base_patch16_224", {}, "vit_base_patch16_224", {}),
    ("vit_base_patch8_224", {"img_size": 96}, "vit_base_patch8_224", {"img_size": 96}),
    ("vit_small_patch16_224", {"reg_tokens": 4}, "vit_small_patch16_224", {"reg_tokens": 4}),
    ("vit_small_patch16_224", {"reg_tokens": 2, "no_embed_class": True}, "vit_small_patch16_224",
     {"reg_tokens": 2, "no_embed_class": True}),
    ("vit_small_patch16_224", {"init_values": 0.1, "qkv_bias": False}, "vit_small_patch16_224",
     {"init_values": 1e-5, "qkv_bias": False}),
    ("vit_tiny_patch16_224", {"embed_dim": 128, "depth": 3, "num_heads": 2, "patch_size": 4, "img_size": 32,
                              "mlp_ratio": 2.0},
     "vit_base_patch16_224", {"embed_dim": 128, "depth": 3, "num_heads": 2, "patch_size": 4, "img_size": 32,
                              "mlp_ratio": 2.0}),
    ("resnet50", {}, "resnet50", {}),
    ("resnet18", {}, "resnet18", {}),
])
def test_infer_config_from_shapes(arch: str, kwargs: dict, expect_arch: str, expect_args: dict) -> None:
    cfg = infer_config(_shapes(arch, **kwargs), "x.pth")
    assert cfg["architecture"] == expect_arch
    assert cfg["model_args"] == expect_args
    # and the inferred config rebuilds a model with exactly these tensors
    with torch.device("meta"):
        rebuilt = timm.create_model(cfg["architecture"], num_classes=0, **cfg["model_args"]).state_dict()
    ref = _shapes(arch, **kwargs)
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in ref.items()}


def test_infer_heads_needs_64d_heads_or_a_hint() -> None:
    sd = _shapes("vit_tiny_patch16_224", embed_dim=48, depth=2, num_heads=3)
    with pytest.raises(CheckpointError, match=r"x\.pth: cannot infer the number of heads for width 48"):
        infer_config(sd, "x.pth")
    assert infer_config(sd, "x.pth", {"num_heads": 3})["model_args"]["num_heads"] == 3
    with pytest.raises(CheckpointError, match="cannot tell the architecture"):
        infer_config({"foo.weight": torch.zeros(1)}, "y.pth")


def test_unwrap_full_checkpoint_teacher_student_and_extras() -> None:
    teacher = {"backbone.cls_token": torch.zeros(1), "head.mlp.0.weight": torch.zeros(2)}
    student = {"module.backbone.cls_token": torch.ones(1), "module.head.last_layer.weight_g": torch.ones(1)}
    bcfg = {"architecture": "vit_small_patch16_224", "model_args": {"depth": 2}}
    ck = {"teacher": teacher, "student": student, "epoch": 7, "optimizer": {},
          "backbone_config": json.dumps(bcfg), "config": json.dumps({"lr": 0.1})}
    sd, extras = unwrap_checkpoint(ck, "ck.pth")
    assert list(sd) == ["cls_token"] and sd["cls_token"].item() == 0
    assert extras["backbone_config"] == bcfg and extras["config"] == {"lr": 0.1} and extras["epoch"] == 7
    sd, _ = unwrap_checkpoint(ck, "ck.pth", which="student")
    assert list(sd) == ["cls_token"] and sd["cls_token"].item() == 1
    # plain state dicts, DDP-wrapped or under "model"/"state_dict"
    sd, _ = unwrap_checkpoint({"model": {"module.pos_embed": torch.zeros(1)}}, "m.pth")
    assert list(sd) == ["pos_embed"]
    with pytest.raises(CheckpointError, match=r"m\.pth: which='student' needs a full training checkpoint"):
        unwrap_checkpoint({"pos_embed": torch.zeros(1)}, "m.pth", which="student")
    with pytest.raises(CheckpointError, match=r"m\.pth: not a state dict"):
        unwrap_checkpoint([1, 2], "m.pth")


def test_check_state_dict_names_every_problem(tiny_vit: torch.nn.Module) -> None:
    sd = dict(tiny_vit.state_dict())
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["cls_token"] = torch.zeros(1, 1, 7)
    with pytest.raises(CheckpointError) as info:
        check_state_dict(tiny_vit, sd, "/data/w.pth")
    msg = str(info.value)
    assert msg.startswith("/data/w.pth: does not fit")
    assert "missing keys: norm.weight" in msg and "unexpected keys: extra.weight" in msg
    assert "cls_token (1, 1, 7) != (1, 1, 48)" in msg and "\n" not in msg
