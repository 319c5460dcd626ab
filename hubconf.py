"""torch.hub entry points, generated from dinokit's registry of known DINO weights.

    torch.hub.load("<this repo>", "dino_vits16")                 # official ViT-S/16 backbone
    torch.hub.load("<this repo>", "dino_vits16", pretrained=False)   # same architecture, random init
    torch.hub.load("<this repo>", "dinokit_load", source="org/name")  # any dinokit.load source

Official files are fetched into (and read from) ``$TORCH_HOME/hub/checkpoints/`` under their
official names, so a file put there by hand works offline.
"""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:  # keep hub.list() clean: only entry points are public callables here
    from collections.abc import Callable
    from typing import Any

    from torch import nn

dependencies = ["torch", "timm"]


def _entry_point(name: str, description: str) -> Callable[..., nn.Module]:
    def entry(*, pretrained: bool = True, weights: str | None = None, **kwargs: Any) -> nn.Module:
        from dinokit.hub import load
        from dinokit.models.registry import get_entry

        if pretrained:
            # weights: as the official DINOv2/v3 entries, a local file instead of the default download
            # (the official enum values "LVD142M" / "LVD1689M" name the default weights)
            if weights is not None and str(weights).upper() not in ("LVD142M", "LVD1689M", "SAT493M"):
                return load(weights, **kwargs)
            return load(name, **kwargs)
        from dinokit.models.backbone import create_backbone

        e = get_entry(name)
        model = create_backbone(e.arch, pretrained_cfg=e.pretrained_cfg, pos_embed_resize=e.pos_embed_resize,
                                **{**e.model_args, **kwargs})
        model.dinokit_name = f"{name} (random init)"
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{description}.\n\n"
                     "pretrained=True loads the official weights (torch.hub cache, or the local file `weights`); "
                     "False gives a random init. Returns an eval-mode backbone: model(x) (B, 3, H, W) -> (B, D), "
                     "the normalized CLS token as the official hub models return.")
    return entry


def dinokit_load(source: str, **kwargs: Any) -> nn.Module:
    """Load any dinokit source: registry name, file, folder or HF Hub repo id (see dinokit.load)."""
    from dinokit.hub import load

    return load(source, **kwargs)


def _register() -> list[str]:
    from dinokit.models.registry import list_models

    names = []
    for e in list_models():
        globals()[e.name] = _entry_point(e.name, e.description)
        names.append(e.name)
    return names


ENTRY_POINTS = [*_register(), "dinokit_load"]
