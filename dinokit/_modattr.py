"""Typed access to the dynamic attributes of a model.

torch types ``nn.Module.__getattr__`` as ``Tensor | Module``, so timm attributes such as
``model.num_features`` (an int), ``model.pretrained_cfg`` (a dict) or ``model.forward_features``
(a method) type-check as neither. These accessors state what the attribute is, in one place, instead
of ignores at every call site. They read exactly what plain attribute access reads (a missing
attribute still raises AttributeError) and convert nothing beyond what the call sites did before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn


def submodule(module: nn.Module, name: str) -> nn.Module:
    """``module.<name>`` for a child module (timm's ``qkv``, ``attn``, ``q_norm``, ...)."""
    return cast(nn.Module, getattr(module, name))


def tensor_attr(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` for a parameter or buffer (``weight``, ``q_bias``, ``periods``, ...)."""
    return cast(torch.Tensor, getattr(module, name))


def int_attr(module: nn.Module, name: str) -> int:
    """``int(module.<name>)`` for an integer attribute (``num_features``, ``num_heads``, ...)."""
    return int(getattr(module, name))


def method(module: nn.Module, name: str) -> Callable[..., Any]:
    """``module.<name>`` for a method the module type does not declare (``forward_features``, ...)."""
    return cast(Callable[..., Any], getattr(module, name))


def pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """timm's ``model.pretrained_cfg`` dict (input size, mean, std, architecture, ...)."""
    return cast(dict[str, Any], model.pretrained_cfg)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (its ``blocks`` Sequential or ModuleList), [] when none."""
    found = getattr(model, "blocks", None)
    return list(found) if isinstance(found, (nn.Sequential, nn.ModuleList)) else []


def set_attr(module: nn.Module, name: str, value: object) -> None:
    """``module.<name> = value`` for a plain (non-tensor, non-module) attribute such as a config dict;
    torch's ``__setattr__`` stub only admits tensors and modules."""
    setattr(module, name, value)
