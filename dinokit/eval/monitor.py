"""The k-NN monitor: an epoch-end callback for :func:`dinokit.train` that scores the teacher backbone.

Teacher features of a labeled train split (the memory) and a val split are computed with
:func:`dinokit.embed` and the eval preprocessing that matches training (recipe mean/std, global crop
size; Fashion-MNIST resized without a centre crop, as ``dinokit export`` records it), then scored
with the official weighted k-NN vote::

    from dinokit.eval.monitor import KNNMonitor
    dinokit.train(cfg, "runs/x", callbacks=[KNNMonitor.from_config(cfg)])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from dinokit.data.labeled import LabeledData, align_classes, resolve_labeled
from dinokit.devices import model_device
from dinokit.embedding import EmbedOptions
from dinokit.eval.cache import embed_labeled
from dinokit.eval.knn import knn_classify
from dinokit.training.config import TrainConfig
from dinokit.training.models import eval_preprocessing

log = logging.getLogger(__name__)


class KNNMonitor:
    """``monitor(backbone) -> {"top1", "top5", "k", "temperature", "n_train", "n_val"}`` (percent).

    The splits are read at the first call (``from_config`` is cheap and can run on every rank);
    unreadable images are skipped from both splits with their labels.
    """

    def __init__(self, train_source: str, val_source: str, preprocessing: Mapping[str, Any], *, k: int = 20,
                 temperature: float = 0.07, batch_size: int = 256, every_epochs: int = 1,
                 num_workers: int = 0) -> None:
        self.train_source, self.val_source = train_source, val_source
        self.preprocessing = dict(preprocessing)
        self.k, self.temperature, self.batch_size = k, temperature, batch_size
        self.every_epochs = every_epochs  # read by the training loop: 0 = only at the end
        self.num_workers = num_workers
        self._splits: tuple[LabeledData, LabeledData] | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> KNNMonitor:
        """The monitor a recipe's ``knn`` section describes; ValueError when it names no sources."""
        k = cfg.knn
        if not k.train_source or not k.val_source:
            raise ValueError("knn.train_source and knn.val_source: both are needed for the k-NN monitor")
        return cls(k.train_source, k.val_source, eval_preprocessing(cfg), k=k.k, temperature=k.temperature,
                   batch_size=k.batch_size, every_epochs=k.every_epochs, num_workers=cfg.data.num_workers)

    def splits(self) -> tuple[LabeledData, LabeledData]:
        """(train, val) with val labels indexed like train's classes; read once."""
        if self._splits is None:
            train = resolve_labeled(self.train_source, "train")
            self._splits = (train, align_classes(train, resolve_labeled(self.val_source, "test")))
        return self._splits

    def __call__(self, backbone: nn.Module) -> dict[str, Any]:
        train, val = self.splits()
        model = _WithPreprocessing(backbone, self.preprocessing)
        opts = EmbedOptions(batch_size=self.batch_size, device=model_device(backbone))
        ftr, ytr, _ = embed_labeled(model, train, opts, use_cache=False, num_workers=_workers(train, self.num_workers))
        fva, yva, _ = embed_labeled(model, val, opts, use_cache=False, num_workers=_workers(val, self.num_workers))
        res = knn_classify(ftr, ytr, fva, yva, k=self.k, T=self.temperature)
        log.info("k-NN: top1 %.2f top5 %.2f (%d train, %d val images)", res["top1"], res["top5"], len(ytr), len(yva))
        return {"top1": float(res["top1"]), "top5": float(res["top5"]), "k": self.k, "temperature": self.temperature,
                "n_train": len(ytr), "n_val": len(yva)}


def _workers(data: LabeledData, num_workers: int) -> int:
    # in-memory arrays decode in microseconds: worker processes would cost more to start than they save
    return 0 if not isinstance(data.images, list) else num_workers


class _WithPreprocessing(nn.Module):
    """The backbone, seen by :func:`dinokit.embed` with the eval preprocessing of the training recipe.

    A view, not a copy: the forward is the backbone's own, and its own ``pretrained_cfg`` is left as is.
    """

    def __init__(self, backbone: nn.Module, preprocessing: Mapping[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.pretrained_cfg = {**dict(getattr(backbone, "pretrained_cfg", None) or {}), **preprocessing}
        self.num_features = int(getattr(backbone, "num_features", 0))
        self.train(backbone.training)  # embed restores this mode afterwards: keep the backbone's own

    def forward(self, x: Any) -> Any:
        return self.backbone(x)
