"""The networks a DINO run trains: student and teacher (backbone + DINO head), their init and placement."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from dinokit import distributed
from dinokit.data.fashion_mnist import is_fashion_mnist_spec
from dinokit.hub import load, read_checkpoint
from dinokit.models.backbone import backbone_config, create_backbone
from dinokit.models.convert import strip_prefix
from dinokit.models.head import DINOHead, MultiCropWrapper
from dinokit.training.config import TrainConfig


def build_models(cfg: TrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop path) and teacher (none) with identical weights; the teacher gets no gradients."""
    m = cfg.model
    args = dict(m.model_args)
    student_bb = create_backbone(m.arch, **args, drop_path_rate=m.drop_path_rate)
    teacher_bb = create_backbone(m.arch, **args)
    embed_dim = int(cast(int, student_bb.num_features))

    def head() -> DINOHead:
        return DINOHead(embed_dim, m.out_dim, use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer,
                        nlayers=m.head_nlayers, hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim)

    student = MultiCropWrapper(student_bb, head())
    teacher = MultiCropWrapper(teacher_bb, head())
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    teacher.train()  # as the official code: BatchNorm (ResNets) uses batch statistics in the teacher too
    return student, teacher


def is_convnet(model: nn.Module) -> bool:
    return any(isinstance(mod, nn.Conv2d) for mod in model.modules()) and not hasattr(model, "patch_embed")


def load_init(student: MultiCropWrapper, teacher: MultiCropWrapper, source: str) -> str:
    """Initialise from an official/dinokit full checkpoint (both networks and heads) or a backbone source.

    Returns what was loaded ("full checkpoint" or "backbone").
    """
    path = Path(source).expanduser()
    obj = read_checkpoint(path) if path.is_file() and path.suffix != ".safetensors" else None
    if isinstance(obj, dict) and "teacher" in obj and "student" in obj:
        for name, net in (("student", student), ("teacher", teacher)):
            sd = strip_prefix(obj[name], "module.")
            try:
                net.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                first = str(e).strip().splitlines()
                raise ValueError(f"{source}: {name} does not fit the configured model "
                                 f"({' '.join(first[:2])[:300]})") from e
        return "full checkpoint"
    sd = load(source).state_dict()
    for net in (student, teacher):
        missing, unexpected = cast(nn.Module, net.backbone).load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: backbone does not fit model.arch/model_args "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return "backbone"


def place_models(student: MultiCropWrapper, teacher: MultiCropWrapper, cfg: TrainConfig, device: torch.device,
                 world: int) -> bool:
    """Move both networks to ``device`` (channels-last for convnets); SyncBatchNorm across processes.

    Returns whether channels-last is used (the data pipeline must produce that layout too).
    """
    channels_last = cfg.model.channels_last and is_convnet(student.backbone)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for net in (student, teacher):
        net.to(device).to(memory_format=fmt)
    if world > 1 and is_convnet(student.backbone):
        # in place: convert_sync_batchnorm swaps the BatchNorm children of these same wrappers
        distributed.sync_batchnorm(student)
        distributed.sync_batchnorm(teacher)
    return channels_last


def checkpoint_backbone_config(backbone: nn.Module) -> dict[str, Any]:
    """The timm config of the teacher backbone, without the student-only drop path rate."""
    cfg = backbone_config(backbone)
    cfg.get("model_args", {}).pop("drop_path_rate", None)
    return cfg


def eval_preprocessing(cfg: TrainConfig) -> dict[str, Any]:
    """The eval preprocessing (a pretrained_cfg overlay) that matches training: recipe mean/std, crop size.

    Fashion-MNIST's 28 px images are centred on the object: resized to the crop size, no centre crop.
    """
    size = int(cfg.data.global_crops_size)
    pcfg: dict[str, Any] = {"input_size": (3, size, size), "mean": tuple(cfg.data.mean), "std": tuple(cfg.data.std)}
    if is_fashion_mnist_spec(cfg.data.source):
        pcfg.update(crop_pct=1.0, interpolation="bilinear")
    return pcfg
