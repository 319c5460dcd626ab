"""Load any DINO checkpoint as a timm backbone; save timm-compatible Hub folders.

:func:`load` accepts a registry name, a local folder or file (official ``.pth``, full training
checkpoint, ``.safetensors``, timm/dinokit folder, HF transformers ViT folder) or an HF Hub repo id.
:func:`save` writes ``config.json`` + ``model.safetensors`` + ``README.md`` in timm's Hub layout, so
``timm.create_model("local-dir:" + folder, pretrained=True)`` rebuilds the same model.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinokit.models.convert import (
    CheckpointError,
    check_state_dict,
    drop_classifier,
    infer_config,
    unwrap_checkpoint,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
CARD_NAME = "README.md"
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")
_PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")

__all__ = ["CheckpointError", "load", "read_checkpoint", "save"]


# ------------------------------------------------------------------------------------ load


def load(
    source: str | os.PathLike[str],
    *,
    which: str = "teacher",
    pretrained_cfg: Mapping[str, Any] | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Load a DINO backbone: an eval-mode timm model whose ``model(x)`` (B, 3, H, W) -> (B, D).

    ``source``: a registry name (``dino_vits16``, ...), a folder (timm/dinokit: config.json +
    model.safetensors; HF transformers ViT), a file (``.safetensors``, official ``.pth``, a full
    training checkpoint: teacher by default, ``which="student"`` on request) or an HF Hub repo id
    (``org/name[@revision]`` or ``hf-hub:org/name``). ``pretrained_cfg`` overrides preprocessing
    (mean, std, input_size, crop_pct, interpolation); ``model_args`` overrides architecture
    arguments read from the tensors (e.g. ``num_heads``). Loads are strict: missing or unexpected
    keys raise :class:`CheckpointError` naming them.
    """
    src = os.fspath(source)
    from dinokit.models.registry import get_entry, is_registry_name

    if src.startswith("hf-hub:"):
        model = _load_hf(src[len("hf-hub:"):], src, which, model_args)
    elif is_registry_name(src):
        model = _load_registry(get_entry(src), model_args)
    else:
        path = Path(src).expanduser()
        if path.is_dir():
            model = _load_folder(path, src, which, model_args)
        elif path.is_file():
            model = _load_file(path, src, which, model_args)
        elif (_HF_REPO_ID.match(src) and not src.startswith((".", "/", "~"))
              and path.suffix.lower() not in (*_TORCH_SUFFIXES, ".safetensors")):
            model = _load_hf(src, src, which, model_args)
        else:
            from dinokit.models.registry import model_names

            raise FileNotFoundError(f"{src}: not a registry model ({', '.join(model_names())}), an existing "
                                    "file or folder, or an HF Hub repo id (org/name)")
    if pretrained_cfg:
        model.pretrained_cfg = {**model.pretrained_cfg, **_tupled(dict(pretrained_cfg))}
    model.dinokit_name = src
    return model.eval()


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Read a ``.safetensors`` or torch file safely (``weights_only=True``; the official
    checkpoints' pickled ``argparse.Namespace`` is the one class allow-listed)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read as a checkpoint with weights_only=True "
                              f"({type(e).__name__}: {msg})") from e


def _load_registry(entry: Any, model_args: Mapping[str, Any] | None) -> nn.Module:
    from dinokit.models.registry import fetch_state_dict

    sd = fetch_state_dict(entry)
    config = {"architecture": entry.arch, "model_args": {**entry.model_args, **(model_args or {})},
              "pretrained_cfg": entry.pretrained_cfg}
    return _build(sd, config, str(entry.cache_path()), "teacher")


def _load_file(path: Path, source: str, which: str, model_args: Mapping[str, Any] | None) -> nn.Module:
    if path.suffix != ".safetensors" and path.suffix.lower() not in _TORCH_SUFFIXES:
        log.debug("%s: unknown suffix, trying torch.load", path)
    obj = read_checkpoint(path)
    config = None
    if path.suffix == ".safetensors" and (path.parent / CONFIG_NAME).is_file():
        config = _read_json(path.parent / CONFIG_NAME)
    return _build(obj, config, str(path), which, model_args)


def _load_folder(folder: Path, source: str, which: str, model_args: Mapping[str, Any] | None) -> nn.Module:
    cfg_file = folder / CONFIG_NAME
    weights = _find_weights(folder)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME}, {LEGACY_WEIGHTS_NAME} or other checkpoint file")
    config = _read_json(cfg_file) if cfg_file.is_file() else None
    return _build(read_checkpoint(weights), config, str(weights), which, model_args)


def _find_weights(folder: Path) -> Path | None:
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    for pattern in ("*.safetensors", "*.pth", "*.pt", "*.bin"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{folder}: several {pattern} files ({', '.join(f.name for f in found)}); "
                             "pass the file itself")
    return None


def _load_hf(repo: str, source: str, which: str, model_args: Mapping[str, Any] | None) -> nn.Module:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from dinokit.models.registry import _offline

    repo_id, _, revision = repo.partition("@")
    offline = _offline()
    if not offline and (why := hub_unreachable()) is not None:
        # no network: answer from the local cache at once instead of retrying for a minute
        log.info("the HF Hub cannot be reached (%s); using the local HF cache (set HF_HUB_OFFLINE=1 "
                    "to skip this check)", why)
        offline = True
    kwargs = {"revision": revision or None, "cache_dir": _hf_cache_dir(), "local_files_only": offline}

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, **kwargs))
        except EntryNotFoundError:  # includes "not in the local cache" when offline
            return None
        except Exception as e:  # network, auth, unknown repo: one line naming the repo
            raise FileNotFoundError(f"{repo}: cannot fetch {name} from the HF Hub ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''})") from e

    cfg_file = fetch(CONFIG_NAME)
    weights = fetch(WEIGHTS_NAME) or fetch(LEGACY_WEIGHTS_NAME)
    if weights is None:
        if offline and not _offline():
            raise FileNotFoundError(f"{repo}: the HF Hub cannot be reached ({hub_unreachable()}) and the model "
                                    "is not in the local HF cache; connect, or copy the repo's files into the "
                                    "cache and set HF_HUB_OFFLINE=1")
        where = "in the local HF cache (HF_HUB_OFFLINE is set)" if offline else "on the HF Hub"
        raise FileNotFoundError(f"{repo}: no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} found {where}")
    config = _read_json(cfg_file) if cfg_file is not None else None
    return _build(read_checkpoint(weights), config, f"{repo} ({weights.name})", which, model_args)


@functools.cache
def hub_unreachable(timeout: float = 3.0) -> str | None:
    """None when the HF Hub endpoint accepts a TCP connection within ``timeout`` s, else the reason.

    huggingface_hub retries a dead network for about a minute per file; one bounded probe per
    process lets an offline machine fail (or fall back to the cache) in seconds.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}"


def _hf_cache_dir() -> str | None:
    # Read at call time (huggingface_hub freezes its constants at import).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from e


def _tupled(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def _config_for(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None, source: str,
                model_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Normalize a timm/dinokit or HF transformers config, or infer one from the tensors."""
    if config is None:
        return infer_config(sd, source, model_args)
    if "architecture" in config:  # timm / dinokit layout
        cfg = {"architecture": config["architecture"], "model_args": dict(config.get("model_args") or {})}
        pcfg = config.get("pretrained_cfg") or {}
        cfg["pretrained_cfg"] = {k: pcfg[k] for k in _PREPROCESSING_KEYS if k in pcfg}
    elif config.get("model_type") == "vit":  # HF transformers ViTConfig: shapes say the rest
        cfg = infer_config(sd, source, {"num_heads": int(config["num_attention_heads"])})
        log.info("%s: HF transformers ViT weights; using DINO's LayerNorm eps 1e-6 and ImageNet "
                 "preprocessing (the HF port's eps 1e-12 / mean-std 0.5 differ slightly)", source)
    else:
        raise CheckpointError(f"{source}: config.json is neither a timm config (architecture) nor an "
                              "HF transformers ViT config (model_type: vit)")
    cfg["model_args"].update(model_args or {})
    return cfg


def _build(obj: Any, config: Mapping[str, Any] | None, source: str, which: str,
           model_args: Mapping[str, Any] | None = None) -> nn.Module:
    """Checkpoint object + optional config -> a strictly loaded backbone."""
    from dinokit.models.backbone import from_backbone_config

    sd, extras = unwrap_checkpoint(obj, source, which)  # HF ViT keys are converted here too
    if config is None and "backbone_config" in extras:
        config = extras["backbone_config"]
    cfg = _config_for(sd, config, source, model_args)
    sd = drop_classifier(sd)
    try:
        # Build on the meta device: no time spent on a random init the weights replace anyway.
        with torch.device("meta"):
            model = from_backbone_config(cfg)
    except Exception as e:
        raise CheckpointError(f"{source}: cannot build {cfg.get('architecture')} "
                              f"with {cfg.get('model_args')} ({type(e).__name__}: {e})") from e
    sd = check_state_dict(model, sd, source)
    expected = model.state_dict()
    sd = {k: v.to(dtype=expected[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # buffers outside the state dict: rebuild for real and copy the weights in
        model = from_backbone_config(cfg)
        model.load_state_dict(sd, strict=True)
    log.debug("%s: loaded %s (%s)", source, cfg["architecture"], extras.get("layout"))
    return model.eval()


# ------------------------------------------------------------------------------------ save


def save(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    metrics: Mapping[str, float] | None = None,
    card: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    license: str = "apache-2.0",
) -> Path:
    """Write ``folder`` in timm's Hub layout: config.json, model.safetensors, README.md.

    ``name`` (default: the folder name) titles the card. ``metrics`` (e.g. ``{"knn_top1": 74.5}``, in %) go into the card's model-index (evaluated on
    ``dataset``); ``card`` is extra Markdown for the card body; ``extra_config`` is merged into
    config.json (timm ignores keys it does not know). Files are written into a temporary folder
    beside ``folder`` and moved into place, so a crash never leaves a half-written model.
    """
    from safetensors.torch import save_file

    from dinokit.models.backbone import backbone_config, identity

    folder = Path(folder)
    config = backbone_config(model)
    ident = identity(model)
    name = name or folder.name
    config["dinokit"] = {"name": name, "source": ident["name"], "fingerprint": ident["fingerprint"]}
    if metrics:
        config["dinokit"]["metrics"] = dict(metrics)
    config.update(dict(extra_config or {}))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_NAME).write_text(model_card(config, name=name, metrics=metrics,
                                                body=card, dataset=dataset, license=license))
        if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
            os.replace(tmp, folder)  # replacing an empty directory is atomic on POSIX
        else:
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder}: exists and is not a folder")
            for f in tmp.iterdir():  # keep other files in the folder; replace ours one by one
                os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved %s to %s", config["dinokit"]["name"], folder)
    return folder


def model_card(config: Mapping[str, Any], *, name: str, metrics: Mapping[str, float] | None = None,
               body: str | None = None, dataset: str | None = None, license: str = "apache-2.0") -> str:
    """README.md with Hub YAML front matter (library timm, DINO tags, model-index for ``metrics``)."""
    import yaml

    front: dict[str, Any] = {
        "library_name": "timm",
        "license": license,
        "pipeline_tag": "image-feature-extraction",
        "tags": ["dino", "self-supervised", "image-feature-extraction", "dinokit", "timm"],
    }
    if dataset:
        front["datasets"] = [dataset]
    if metrics:
        ds = dataset or "unknown"
        front["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": _task_name(key)},
            "dataset": {"name": ds, "type": ds},
            "metrics": [{"type": "accuracy", "name": key, "value": float(value)}],
        } for key, value in metrics.items()]}]
    pcfg = config.get("pretrained_cfg", {})
    size = pcfg.get("input_size", [3, 224, 224])
    is_vit = str(config.get("architecture", "")).startswith(("vit", "deit", "eva"))
    size_note = ("any size works: position embeddings are interpolated" if is_vit
                 else "any size works: convolutions and global pooling")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {name}", "",
        "A DINO self-supervised vision backbone (Caron et al., 2021), saved by dinokit in timm's layout. "
        "`model(x)` returns (B, D) image features.", "",
        "## Usage", "",
        "```python",
        "import dinokit",
        f'model = dinokit.load("{name}")  # or a local copy of this folder',
        "features = dinokit.embed(model, \"images/\").features",
        "",
        "import timm  # plain timm works too",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)',
        "```", "",
        "## Details", "",
        "| | |", "|---|---|",
        f"| architecture | `{config.get('architecture')}` |",
        f"| features | {config.get('num_features')} |",
        f"| input size | {size[-2]}x{size[-1]} ({size_note}) |",
        f"| preprocessing | resize {pcfg.get('interpolation', 'bicubic')} with crop_pct "
        f"{pcfg.get('crop_pct')}, center crop, mean {pcfg.get('mean')}, std {pcfg.get('std')} |",
        f"| fingerprint | `{config.get('dinokit', {}).get('fingerprint')}` |",
        f"| license | {license} (these weights; see the repository's LICENSE) |",
    ]
    if metrics:
        lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {float(v):.2f} |" for k, v in metrics.items()]
    if body:
        lines += ["", body.strip()]
    return "\n".join(lines) + "\n"


def _task_name(metric: str) -> str:
    m = metric.lower()
    if m.startswith("knn"):
        return "k-NN classification"
    if m.startswith("linear"):
        return "linear probe"
    return "image classification"
