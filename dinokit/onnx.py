"""ONNX export of DINO backbones (v1, v2, v2-reg, v3 ViTs; CNNs), checked with onnxruntime.

The graph computes ``compute_features(model, x, features)`` for every feature kind ("cls" (B, D),
"cls+avgpool", "lastN", "patch" (B, P, D), "registers"), with the torch.export-based exporter. The batch axis is always dynamic; height and
width are dynamic for every family here (the DINO v1/v2 offset resize and the DINOv3 RoPE table are
built from tensor ops while exporting). :func:`export_onnx` checks the file with onnxruntime at the
example size and a second size, and re-exports at a fixed size if a dynamic graph is not exact.
:class:`OnnxFeatures` runs such a file for ``dinokit embed --runtime onnx``, exported once per model,
image size and feature kind into ``$DINOKIT_CACHE/onnx`` (:func:`cached_export`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from dinokit._io import atomic_path
from dinokit._modattr import tensor_attr

log = logging.getLogger(__name__)

# bump when the exported graph changes for the same model, so cached exports are redone
EXPORT_VERSION = 1


class _Features(nn.Module):
    """``compute_features(model, x, features)`` as a module with one tensor in and out (for export)."""

    def __init__(self, model: nn.Module, features: str) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dinokit.models.features import compute_features

        return compute_features(self.model, x, self.features)


@dataclass
class OnnxExport:
    """What was written: path, the feature kind, the sizes checked and the largest difference
    between onnxruntime and torch over those checks (None when not checked)."""

    path: Path
    features: str
    dynamic_size: bool
    checked_sizes: list[tuple[int, int]]
    max_abs_diff: float | None


def _input_hw(model: nn.Module, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if image_size is None:
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))[-2:]
        return int(size[0]), int(size[1])
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def _patch(model: nn.Module) -> int:
    ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if ps is None:
        return 32  # CNNs: any multiple of the total stride works; 32 covers ResNets and ConvNeXts
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def run_onnx(path: str | os.PathLike[str], x: np.ndarray) -> np.ndarray:
    """Run an exported model with onnxruntime on CPU: x float32 (B, 3, H, W) -> features."""
    sess = _session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def dynamic_size_exportable(model: nn.Module) -> bool:
    """Whether the exported graph can take any image size: True for CNNs, ViTs with a position table
    (DINO v1 / DINOv2 export their 0.1-offset resize as weight matrices) and DINOv3-style RoPE with
    per-axis normalized coordinates (exported through :func:`_traceable_rope`)."""
    rope = getattr(model, "rope", None)
    return rope is None or _rope_is_dinov3(rope)


def _rope_is_dinov3(rope: nn.Module) -> bool:
    return (hasattr(rope, "periods") and getattr(rope, "normalize_coords", None) == "separate"
            and not getattr(rope, "grid_offset", 0.0) and getattr(rope, "grid_indexing", "ij") == "ij")


def _centres(n: int | torch.SymInt) -> torch.Tensor:
    """Patch centres (i + 0.5) / n mapped to [-1, 1], (n,)."""
    # torch's stubs type Tensor / SymInt as Tensor | SymFloat; it is a tensor
    return cast(torch.Tensor, (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1)


def _rope_table(rope: nn.Module, h: int | torch.SymInt, w: int | torch.SymInt) -> torch.Tensor:
    """DINOv3 RoPE table (h*w, 2 * head_dim) = [sin, cos] in timm's layout, from tensor ops only:
    patch centres (i + 0.5) / n mapped to [-1, 1] per axis, angles 2 pi coord / period."""
    ch, cw = _centres(h), _centres(w)
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).reshape(-1, 2)
    periods = tensor_attr(rope, "periods").float()
    angles = (2 * torch.pi * coords[:, :, None] / periods[None, None, :]).flatten(1)
    sin, cos = angles.sin(), angles.cos()
    if getattr(rope, "rotate_half", True):
        sin, cos = torch.cat([sin, sin], -1), torch.cat([cos, cos], -1)
    else:
        sin, cos = sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)
    return torch.cat([sin, cos], dim=-1)


@contextlib.contextmanager
def _traceable_rope(model: nn.Module) -> Iterator[None]:
    """While exporting, build timm's DINOv3 RoPE table from tensor ops so the exporter keeps the
    grid size symbolic (timm computes it from Python floats, which the exporter would freeze)."""
    rope = getattr(model, "rope", None)
    if rope is None or not _rope_is_dinov3(rope):
        yield
        return
    original = rope.get_embed

    def get_embed(shape: list[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if shape is None:
            return original(shape, dtype)
        table = _rope_table(rope, shape[0], shape[1])
        return table if dtype is None else table.to(dtype)

    rope.get_embed = get_embed
    try:
        yield
    finally:
        del rope.get_embed  # back to the class method


def export_onnx(model: nn.Module, path: str | os.PathLike[str], *, features: str = "cls",
                image_size: int | tuple[int, int] | None = None, opset: int = 18,
                check: bool = True) -> OnnxExport:
    """Export ``model`` (eval mode, CPU, float32) to ``path``; see the module docstring.

    ``image_size``: the example input size (default: the model's input_size), rounded down to a
    multiple of the patch. The batch axis is dynamic; height and width too where
    :func:`dynamic_size_exportable` says so. With ``check``, onnxruntime runs the file at the
    example size (and at a second size when the size is dynamic) against torch; a dynamic graph
    that is not within 1e-4 at the second size is re-exported with a fixed size.
    """
    from dinokit.models.features import check_features

    check_features(features)
    model = model.eval().to("cpu", torch.float32)
    wrapped = _Features(model, features).eval()
    p = _patch(model)
    hw = _input_hw(model, image_size)
    hw = (max(p, hw[0] - hw[0] % p), max(p, hw[1] - hw[1] % p))
    out = Path(path)
    dynamic = dynamic_size_exportable(model)
    _write(wrapped, out, hw, p, opset, dynamic)
    if not check:
        return OnnxExport(out, features, dynamic, [], None)
    sizes = [hw, (hw[0] + p, hw[1] + 2 * p)] if dynamic else [hw]
    diffs = [_compare(wrapped, out, s, i) for i, s in enumerate(sizes)]
    if dynamic and diffs[-1] > 1e-4:
        log.warning("%s: not exact at %s (max abs diff %.2g); exporting with a fixed %dx%d size",
                    out, sizes[-1], diffs[-1], *hw)
        dynamic, sizes = False, [hw]
        _write(wrapped, out, hw, p, opset, dynamic=False)
        diffs = [_compare(wrapped, out, hw, 0)]
    return OnnxExport(out, features, dynamic, sizes, max(diffs))


def _write(wrapped: _Features, out: Path, hw: tuple[int, int], patch: int, opset: int, dynamic: bool) -> None:
    """torch.onnx.export (the torch.export-based exporter) of ``wrapped`` at ``hw``, atomically."""
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes: dict[int, object] = {0: batch}
    if dynamic:
        shapes[2] = patch * torch.export.Dim("rows", min=1, max=1024)
        shapes[3] = patch * torch.export.Dim("cols", min=1, max=1024)
    with atomic_path(out) as tmp, torch.no_grad(), _traceable_rope(wrapped.model):
        torch.onnx.export(wrapped, (x,), str(tmp), input_names=["pixel_values"], output_names=["features"],
                          dynamic_shapes=(shapes,), opset_version=opset, dynamo=True, external_data=False,
                          verbose=False)


def _compare(wrapped: _Features, out: Path, hw: tuple[int, int], seed: int) -> float:
    """Largest |onnxruntime - torch| on a random batch of 2 images of size ``hw``."""
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = wrapped(x).numpy()
    got = run_onnx(out, x.numpy())
    if got.shape != want.shape:
        raise ValueError(f"{out}: onnxruntime gave {got.shape}, torch {want.shape}")
    return float(np.abs(got - want).max())


def _onnxruntime() -> Any:
    """The onnxruntime module (an optional dependency: only ONNX users need it), or a one-line error."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("runtime 'onnx' needs onnxruntime: pip install onnxruntime") from e
    return onnxruntime


def _session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (default: torch's thread count)."""
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1  # one graph, run op after op: a second pool would only compete
    # no spin-waiting between ops: embedding shares the cores with its decode workers, and ViT-S/16's
    # ops are large enough that waking threads costs little (pipeline 1.12x with it off, 2 cores)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=4)
def _cached_session(path: str, threads: int) -> Any:
    """One session per cached file and thread count in a process (embed calls in a loop reuse it)."""
    return _session(path, threads)


def onnx_cache_path(model: nn.Module, features: str, image_size: int | tuple[int, int] | None = None) -> Path:
    """Where :func:`cached_export` keeps the export of ``model`` (its weights' fingerprint and
    architecture), the image size and the feature kind: ``$DINOKIT_CACHE/onnx/<key>.onnx``."""
    from dinokit.eval.cache import cache_root
    from dinokit.models.backbone import fingerprint

    payload = {"v": EXPORT_VERSION, "model": fingerprint(model), "arch": type(model).__name__,
               "size": list(_input_hw(model, image_size)), "features": features, "torch": torch.__version__}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "onnx" / f"{key}.onnx"


def cached_export(model: nn.Module, features: str, image_size: int | tuple[int, int] | None = None) -> Path:
    """The checked ONNX export of ``model`` for ``features`` at ``image_size`` from the cache, exported
    (about 10-60 s, logged) on first use. The file appears whole or not at all, so processes that
    export at once (torchrun ranks) each write their own temp file and the last rename wins."""
    path = onnx_cache_path(model, features, image_size)
    if path.is_file():
        return path
    _check_kind(model, features, _input_hw(model, image_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting the model to ONNX once (%s features): %s", features, path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    try:
        result = export_onnx(model, tmp, features=features, image_size=image_size)
        log.info("ONNX export checked against torch: max abs diff %.2g", result.max_abs_diff or 0.0)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_kind(model: nn.Module, features: str, hw: tuple[int, int]) -> None:
    """The one-line error torch gives for a feature kind this model lacks (e.g. "registers" of DINO v1,
    "patch" of a CNN), at the cost of one small forward instead of a failed export."""
    from dinokit.models.features import compute_features

    with torch.inference_mode():
        compute_features(model.eval().to("cpu", torch.float32), torch.zeros(1, 3, *hw), features)


class OnnxFeatures:
    """``compute_features(model, x, features)`` run by onnxruntime on the CPU: x (B, 3, H, W) float
    tensor -> float32 CPU tensor, as the torch path gives (the batch size may change per call)."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self._session = _cached_session(str(self.path), self.threads)
        self._input = self._session.get_inputs()[0].name

    @classmethod
    def for_model(cls, model: nn.Module, features: str, image_size: int | tuple[int, int] | None = None,
                  threads: int | None = None) -> OnnxFeatures:
        """The cached export of ``model`` (:func:`cached_export`), ready to run."""
        _onnxruntime()  # before a long export
        return cls(cached_export(model, features, image_size), threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._session.run(None, {self._input: arr})[0])

