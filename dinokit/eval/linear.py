"""Linear probe: one linear layer on frozen DINO features (the official protocol and a fast mode).

Official protocol (DINO ``eval_linear.py``): frozen backbone; ViT-S features = the CLS tokens of the
last 4 blocks concatenated ("last4"), ViT-B = the last CLS and the mean patch token
("cls+avgpool"); one ``nn.Linear`` (weight ~ N(0, 0.01), bias 0); SGD, momentum 0.9, no weight decay,
lr = 0.001 * batch / 256, cosine to 0 over the epochs; train images get RandomResizedCrop + flip,
val images the eval preprocessing. That needs a backbone forward per train image per epoch.

Fast mode: features are extracted once (eval preprocessing, no augmentation, cached on disk) and the
layer is trained on them; several learning rates are trained at once as one wide layer (each head
gets its own gradient scale, which equals SGD with its own lr), the best is picked on a held-out
part of the train set, and that lr is retrained on all of it. Seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torchvision import transforms as T

from dinokit._io import atomic_path
from dinokit._types import Progress
from dinokit.data.images import ImageDataset, collate_skipping
from dinokit.data.labeled import LabeledData, align_classes, resolve_labeled
from dinokit.data.sources import ArrayDataset
from dinokit.data.transforms import ensure_rgb, preprocessing_config
from dinokit.devices import resolve_device
from dinokit.embedding import EmbedOptions, compute_features, default_num_workers, embed, feature_dim
from dinokit.eval.cache import embed_labeled
from dinokit.eval.knn import _metrics, rank_classes
from dinokit.hub import load
from dinokit.models.backbone import identity

logger = logging.getLogger(__name__)

FAST_LRS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)


# ------------------------------------------------------------------------------------------ the head


class LinearHead(nn.Module):
    """A linear classifier on frozen features: ``forward(features (B, D)) -> logits (B, C)``.
    ``classes`` names the outputs; ``features`` is the feature kind it was trained on (``cls``,
    ``last4``, ``cls+avgpool``, ...), so :func:`classify` can extract the same features again.
    """
    def __init__(self, in_dim: int, num_classes: int, classes: Sequence[str] | None = None,
                 features: str = "cls", info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)  # official init
        self.linear.bias.data.zero_()
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        if len(self.classes) != num_classes:
            raise ValueError(f"{len(self.classes)} class names for {num_classes} outputs")
        self.features = features
        self.info = dict(info or {})

    @property
    def in_dim(self) -> int:
        return self.linear.in_features

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, topk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``topk`` (probabilities (B, k), class indices (B, k)) for features x (B, D)."""
        probs = self(x.float()).softmax(dim=1)
        return probs.topk(min(topk, self.num_classes), dim=1)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``.safetensors`` (weight, bias; classes, feature kind and info in the metadata), atomically."""

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.linear.weight.detach().cpu().contiguous(),
                   "bias": self.linear.bias.detach().cpu().contiguous()}
        meta = {"format": "pt", "dinokit": "linear-head", "classes": json.dumps(self.classes),
                "features": self.features, "info": json.dumps(self.info, default=str)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LinearHead:
        """Read a head written by :meth:`save`."""

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
            classes = json.loads(meta["classes"])
            info = json.loads(meta.get("info", "{}"))
        except (SafetensorError, KeyError, OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a dinokit linear head ({type(e).__name__}: {e})") from e
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"{path}: bad head shapes weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")
        head = cls(weight.shape[1], weight.shape[0], classes, meta.get("features", "cls"), info)
        head.linear.weight.data.copy_(weight)
        head.linear.bias.data.copy_(bias)
        return head.eval()


def head_from_official(checkpoint: str | os.PathLike[str] | dict[str, Any], features: str = "last4",
                       classes: Sequence[str] | None = None) -> LinearHead:
    """A :class:`LinearHead` from DINO's published linear weights (``*_linearweights.pth``).
    The official file holds ``{"state_dict": {"module.linear.weight", "module.linear.bias"}, ...}``.
    With ``features="cls+avgpool"`` the official code interleaves the features (cls_0, avg_0, cls_1,
    avg_1, ...) while dinokit concatenates them (cls..., avg...), so the weight columns are
    reordered to match dinokit's order.
    """
    if isinstance(checkpoint, dict):
        obj, source = checkpoint, "checkpoint"
    else:
        source = str(checkpoint)
        if not Path(source).is_file():
            raise FileNotFoundError(f"{source}: no such file")
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle that needs unknown classes, or not a torch file
            raise ValueError(f"{source}: not a readable linear-weights file ({type(e).__name__}: {e})") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{source}: no state_dict in the file")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "linear.weight" not in sd or "linear.bias" not in sd:
        raise ValueError(f"{source}: expected linear.weight and linear.bias, found {sorted(sd)[:6]}")
    weight, bias = sd["linear.weight"].float(), sd["linear.bias"].float()
    if features == "cls+avgpool":
        weight = torch.cat([weight[:, 0::2], weight[:, 1::2]], dim=1)
    head = LinearHead(weight.shape[1], weight.shape[0], classes, features, {"source": source})
    head.linear.weight.data.copy_(weight)
    head.linear.bias.data.copy_(bias)
    return head.eval()


def default_features(model: nn.Module) -> str:
    """The official linear-eval features: ViT-B (and wider) "cls+avgpool", smaller ViTs "last4"
    (fewer when the model has fewer blocks), CNNs "cls"."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "num_prefix_tokens"):
        return "cls"
    if int(model.num_features) >= 768:
        return "cls+avgpool"
    return f"last{min(4, len(blocks))}"


# ------------------------------------------------------------------------------------------ results


@dataclass
class LinearProbeResult:
    """The trained head and its scores on the val set (percent)."""
    head: LinearHead
    top1: float
    top5: float
    per_class: list[float | None]
    confusion: list[list[int]]
    settings: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """JSON-ready summary: top1, top5, per-class accuracy with names, confusion, settings."""
        return {
            "top1": self.top1, "top5": self.top5,
            "per_class": dict(zip(self.head.classes, self.per_class, strict=True)),
            "classes": self.head.classes, "confusion": self.confusion,
            "settings": self.settings, "history": self.history,
        }


@torch.no_grad()
def evaluate_head(head: LinearHead, features: torch.Tensor, labels: torch.Tensor | np.ndarray,
                  batch_size: int = 8192) -> dict[str, Any]:
    """top1/top5 (percent), per-class top-1 and the confusion of ``head`` on features (N, D)."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    head = head.eval()
    logits = torch.cat([head(features[i:i + batch_size].float()) for i in range(0, len(features), batch_size)])
    return _metrics(rank_classes(logits), y, head.num_classes)


# ------------------------------------------------------------------------------------------ fast mode


@torch.no_grad()
def _train_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs: Sequence[float], epochs: int,
                 batch_size: int, seed: int, progress: Progress | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """SGD (momentum 0.9, no wd, cosine to 0 per iteration) of one linear head per lr, all at once.
    x (N, D), y (N,). Returns weights (L, C, D) and biases (L, C). The heads are one wide layer
    (L*C outputs, one matmul); each head's softmax cross-entropy gradient is written by hand, and
    its update uses its own lr (torch.optim.SGD semantics: buf = 0.9 buf + g; w -= lr * buf).
    The data are shuffled once; each epoch visits the batches in a new random order (no copies).
    """
    n, d = x.shape
    n_heads, c = len(lrs), num_classes
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    x, y = x[perm].contiguous(), y[perm]
    weight = torch.randn(n_heads * c, d, generator=g) * 0.01  # official init N(0, 0.01)
    bias = torch.zeros(n_heads * c)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    lr_rows = torch.tensor(lrs, dtype=torch.float32).repeat_interleave(c)  # (L*C,)
    starts = list(range(0, n, batch_size))
    total = epochs * len(starts)
    step = 0
    for _ in range(epochs):
        for b in torch.randperm(len(starts), generator=g).tolist():
            xb, yb = x[starts[b]:starts[b] + batch_size], y[starts[b]:starts[b] + batch_size]
            logits = torch.addmm(bias, xb, weight.T).view(len(yb), n_heads, c)
            grad = logits.softmax(dim=2)  # d(mean CE)/d(logits) = (softmax - onehot) / B, per head
            grad[torch.arange(len(yb)), :, yb] -= 1.0
            grad = grad.view(len(yb), n_heads * c).div_(len(yb))
            buf_w.mul_(0.9).add_(grad.T @ xb)
            buf_b.mul_(0.9).add_(grad.sum(dim=0))
            sched = 0.5 * (1 + math.cos(math.pi * step / total))
            weight.sub_(buf_w * (lr_rows * sched).unsqueeze(1))
            bias.sub_(buf_b * lr_rows * sched)
            step += 1
        if progress is not None:
            progress(step, total)
    return weight.view(n_heads, c, d), bias.view(n_heads, c)


def fit_linear(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    feature_kind: str = "cls",
    epochs: int = 30,
    lr: float | Sequence[float] | None = None,
    batch_size: int = 1024,
    holdout: float = 0.1,
    seed: int = 0,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> tuple[LinearHead, dict[str, Any]]:
    """Fast linear probe on frozen features (N, D) with int labels (N,): no augmentation.
    ``lr``: one value (used as is) or several (default :data:`FAST_LRS`, scaled by batch / 256 like
    the official lr) trained at once; the best on a ``holdout`` fraction of the train set (stratified
    by nothing, just a seeded random split) is retrained on everything. Returns the head and a
    settings dict (chosen lr, held-out accuracy per lr, epochs, batch size).

    ``threads``: torch CPU threads while training (restored afterwards; None keeps the current
    setting). The default 1 is deliberate: each step is a small matmul, and thread hand-offs cost
    more than they save (on a busy 2-core machine, 10x more).
    """
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).float()
    x = x.flatten(1).cpu().contiguous()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
    if len(x) == 0:
        raise ValueError("no training features")
    c = num_classes or (len(classes) if classes is not None else int(y.max()) + 1)
    if int(y.max()) >= c or int(y.min()) < 0:
        raise ValueError(f"labels must be in [0, {c}); got {int(y.min())}..{int(y.max())}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 (got {epochs})")
    lrs = [lr] if isinstance(lr, (int, float)) else list(lr or [v * batch_size / 256 for v in FAST_LRS])
    settings: dict[str, Any] = {"mode": "fast", "epochs": epochs, "batch_size": batch_size,
                                "features": feature_kind}
    with _torch_threads(threads):
        head = _fit(x, y, c, lrs, classes, feature_kind, epochs, batch_size, holdout, seed, settings, progress)
    return head, settings


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _fit(x: torch.Tensor, y: torch.Tensor, c: int, lrs: list[float], classes: Sequence[str] | None,
         feature_kind: str, epochs: int, batch_size: int, holdout: float, seed: int, settings: dict[str, Any],
         progress: Progress | None) -> LinearHead:
    if len(lrs) > 1 and holdout > 0 and len(x) >= 20:
        g = torch.Generator().manual_seed(seed + 1)
        perm = torch.randperm(len(x), generator=g)
        n_val = max(1, round(holdout * len(x)))
        va, tr = perm[:n_val], perm[n_val:]
        w, b = _train_heads(x[tr], y[tr], c, lrs, epochs, batch_size, seed)
        acc = [float(((x[va] @ w[i].T + b[i]).argmax(1) == y[va]).float().mean()) * 100 for i in range(len(lrs))]
        best = int(np.argmax(acc))
        settings["lr_sweep"] = {f"{v:g}": a for v, a in zip(lrs, acc, strict=True)}
        logger.info("linear probe lr sweep (held-out top-1): %s -> lr %g", settings["lr_sweep"], lrs[best])
        lrs = [lrs[best]]
    w, b = _train_heads(x, y, c, lrs, epochs, batch_size, seed, progress)
    settings["lr"] = lrs[0]
    head = LinearHead(x.shape[1], c, classes, feature_kind, {"settings": settings})
    head.linear.weight.data.copy_(w[0])
    head.linear.bias.data.copy_(b[0])
    return head.eval()


# ------------------------------------------------------------------------------------------ official


def train_transform(model: nn.Module, image_size: int | None = None) -> Callable[[Any], torch.Tensor]:
    """Official linear-eval train augmentation: RandomResizedCrop(S) + horizontal flip + normalize."""


    p = preprocessing_config(model, image_size)
    return T.Compose([
        T.Lambda(ensure_rgb),
        T.RandomResizedCrop(p["crop_size"]),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(p["mean"], p["std"]),
    ])


def _train_official(model: nn.Module, data: Any, head: LinearHead, *, epochs: int, lr: float, batch_size: int,
                    device: torch.device, num_workers: int, image_size: int | None, seed: int,
                    progress: Progress | None) -> tuple[list[dict[str, float]], list[tuple[str, str]]]:

    tf = train_transform(model, image_size)
    ds = ArrayDataset(data.images, tf) if isinstance(data.images, np.ndarray) else ImageDataset(data.images, tf)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         collate_fn=collate_skipping, generator=g, drop_last=False,
                                         persistent_workers=num_workers > 0)
    labels = torch.as_tensor(data.labels, dtype=torch.int64)
    head = head.to(device).train()
    model = model.to(device).eval()
    opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    history: list[dict[str, float]] = []
    reported: dict[str, str] = {}
    total = epochs * len(loader)
    step = 0
    for epoch in range(epochs):
        loss_sum, seen = 0.0, 0
        for batch in loader:
            for s in batch.skipped:
                if s.path not in reported:
                    reported[s.path] = s.reason
                    logger.warning("skipped %s: %s", s.path, s.reason)
            step += 1
            if batch.images is None:
                continue
            with torch.no_grad():
                feats = compute_features(model, batch.images.to(device), head.features).flatten(1)
            loss = F.cross_entropy(head(feats.float()), labels[batch.indices].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(batch.indices)
            seen += len(batch.indices)
            if progress is not None:
                progress(step, total)
        sched.step()
        history.append({"epoch": epoch, "loss": loss_sum / max(1, seen)})
        logger.info("linear probe epoch %d/%d loss %.4f", epoch + 1, epochs, history[-1]["loss"])
    return history, sorted(reported.items())


def linear_probe(
    model: nn.Module | str,
    train: Any,
    val: Any,
    *,
    fast: bool = False,
    features: str | None = None,
    epochs: int | None = None,
    lr: float | Sequence[float] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    image_size: int | None = None,
    use_cache: bool = True,
    seed: int = 0,
    progress: Progress | None = None,
) -> LinearProbeResult:
    """Linear evaluation of a frozen backbone on a labeled train and val set.
    ``train`` / ``val``: a folder (``DIR/<class>/<image>``), a ``fashion-mnist[...]`` spec (train
    defaults to @train, val to @test) or a :class:`~dinokit.data.labeled.LabeledData`.
    ``fast=False``: the official protocol (augmented train images through the frozen backbone every
    epoch; defaults epochs 100, lr 0.001, batch 128). ``fast=True``: cached features, no
    augmentation (defaults epochs 30, lr sweep, batch 1024). ``features`` defaults to the official
    choice for the architecture (:func:`default_features`). Unreadable images are skipped.
    """
    if isinstance(model, str):
        model = load(model)
    tr = train if isinstance(train, LabeledData) else resolve_labeled(train, "train")
    va = align_classes(tr, val if isinstance(val, LabeledData) else resolve_labeled(val, "test"))
    kind = features or default_features(model)
    dev = resolve_device(device)
    opts = EmbedOptions(features=kind, batch_size=batch_size or 64, device=dev, num_workers=num_workers,
                        image_size=image_size)
    xva, yva, skipped_va = embed_labeled(model, va, opts, use_cache=use_cache)
    ident: dict[str, Any] = {}
    try:
        i = identity(model)
        ident = {"model": i["name"], "arch": i["arch"], "fingerprint": i["fingerprint"]}
    except Exception as e:  # a bare nn.Module: the head still works
        logger.debug("no model identity: %s", e)
    if fast:
        xtr, ytr, skipped_tr = embed_labeled(model, tr, opts, use_cache=use_cache)
        head, settings = fit_linear(xtr, ytr, num_classes=len(tr.classes), classes=tr.classes, feature_kind=kind,
                                    epochs=epochs or 30, lr=lr, batch_size=batch_size or 1024, seed=seed,
                                    progress=progress)
        history: list[dict[str, float]] = []
    else:
        torch.manual_seed(seed)
        head = LinearHead(feature_dim(model, kind), len(tr.classes), tr.classes, kind)
        lr0 = float(lr if isinstance(lr, (int, float)) else 0.001)
        bs = batch_size or 128
        ep = epochs or 100
        workers = default_num_workers() if num_workers is None else num_workers
        history, skipped_tr = _train_official(model, tr, head, epochs=ep, lr=lr0, batch_size=bs, device=dev, num_workers=workers,
                                  image_size=image_size, seed=seed, progress=progress)
        head = head.cpu().eval()
        settings = {"mode": "official", "epochs": ep, "lr": lr0, "effective_lr": lr0 * bs / 256,
                    "batch_size": bs, "features": kind}
    head.info = {**ident, "settings": settings, "train": tr.name}
    m = evaluate_head(head, xva, yva)
    settings = {**settings, "num_train": len(tr) - len(skipped_tr), "num_val": len(yva),
                "skipped": [list(s) for s in (*skipped_tr, *skipped_va)]}
    return LinearProbeResult(head, m["top1"], m["top5"], m["per_class"], m["confusion"], settings, history)


def classify(model: nn.Module, head: LinearHead, images: Any, *, topk: int = 1, batch_size: int = 64,
             device: str | torch.device | None = None, num_workers: int | None = None,
             progress: Progress | None = None) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Predict classes for images (paths, folder or uint8 array) with a trained head.
    Returns ``([{"path", "label", "prob", "topk": [(label, prob), ...]}], skipped)``.
    """
    emb = embed(model, images, batch_size=batch_size, device=device, num_workers=num_workers,
                features=head.features, progress=progress)
    if emb.features.shape[1:].numel() != head.in_dim:
        raise ValueError(f"head expects {head.in_dim}-d {head.features!r} features; the model gives "
                         f"{emb.features.shape[1:].numel()}")
    probs, idx = head.predict(emb.features.flatten(1), topk=topk)
    rows = []
    for path, p, i in zip(emb.paths, probs.tolist(), idx.tolist(), strict=True):
        rows.append({"path": path, "label": head.classes[i[0]], "prob": p[0],
                     "topk": [(head.classes[c], q) for c, q in zip(i, p, strict=True)]})
    return rows, list(emb.skipped)
