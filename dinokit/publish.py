"""Publishing: export a training run's backbone as a timm-compatible folder, push a folder to the Hub.

``export(run_dir, folder)`` loads the teacher (or student) backbone from the run's checkpoint and
writes it with :func:`dinokit.save` plus a model card holding the recipe, the data, the training
time, the hardware and the measured k-NN. ``push(folder, repo_id)`` uploads such a folder with
huggingface_hub and returns the commit URL.
"""

from __future__ import annotations

import json
import logging
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


CHECKPOINT_NAME = "checkpoint.pth"


class PushError(OSError):
    """An upload that cannot happen (no token, no network, Hub refusal); the message is one line."""


def _resolve_token(token: str | None) -> str | None:
    """The explicit token, else HF_TOKEN or the saved ``hf auth login`` token (huggingface_hub's order)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``folder`` (an exported model) to the Hub model repo ``repo_id``; return the commit URL.

    The repo is created if missing (``exist_ok``); with ``revision`` the branch is created from main
    first. Raises FileNotFoundError for a missing folder, ValueError for a malformed repo id and
    PushError (one line) without a token, without network or when the Hub refuses.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; export a model with `dinokit export` first")
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id}: not a Hub repo id; expected org/name")
    token = _resolve_token(token)
    if not token:
        raise PushError(f"{repo_id}: no Hugging Face token; pass --token, set HF_TOKEN or run `hf auth login`")

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    message = commit_message or f"Upload {folder.name} with dinokit"
    try:
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=message,
        )
    except PushError:
        raise
    except Exception as exc:  # network, offline mode, auth and Hub errors all become one line
        raise PushError(f"{repo_id}: upload failed: {_one_line(exc)}") from exc
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %s to %s (%s)", folder, repo_url, url)
    return url


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


# ---------------------------------------------------------------- export
def export(
    run_dir: str | Path,
    folder: str | Path,
    *,
    which: str = "teacher",
    checkpoint: str | Path | None = None,
    name: str | None = None,
    knn: Mapping[str, Any] | None = None,
    hardware: str | None = None,
    pretrained_cfg: Mapping[str, Any] | None = None,
    notes: str | None = None,
) -> Path:
    """Write the backbone of a training run as a timm-compatible folder with a model card.

    ``run_dir``: a ``dinokit train`` output folder (checkpoint.pth, config.json, summary.json,
    log_knn.jsonl). ``which``: "teacher" (what DINO evaluates and people use) or "student".
    ``checkpoint``: another checkpoint file of the run (default RUN_DIR/checkpoint.pth).
    ``knn``: a k-NN result measured elsewhere (``{"top1", "top5", "k", "temperature", "n_train",
    "n_val"}``); by default the run's last k-NN record at the checkpoint's iteration is used.
    ``hardware``: what the run trained on, for the card (default: the run's device).
    ``pretrained_cfg``: preprocessing overrides; by default mean/std and input size come from the
    training recipe (crop_pct 1.0 for Fashion-MNIST, whose images are the whole object).
    The card holds the recipe, the data, the training time and hardware and the k-NN numbers;
    config.json gets them too under ``dinokit_train``. Returns ``folder``.
    """
    import dinokit
    from dinokit.hub import read_checkpoint
    from dinokit.training.config import TrainConfig

    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}: expected 'teacher' or 'student'")
    run_dir = Path(run_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else run_dir / CHECKPOINT_NAME
    if not ckpt.is_file():
        where = run_dir if checkpoint is None else ckpt
        raise FileNotFoundError(f"{where}: no training checkpoint ({ckpt.name}); is this a dinokit run folder?")
    state = read_checkpoint(ckpt)
    if not isinstance(state, dict) or "config" not in state or which not in state:
        raise ValueError(f"{ckpt}: not a dinokit training checkpoint (needs '{which}' and 'config')")
    cfg = TrainConfig.from_json(state["config"], str(ckpt))
    summary = _read_json_file(run_dir / "summary.json")
    iteration = int(state.get("iteration", summary.get("iterations", 0) or 0))
    if knn is None:
        knn = _knn_record(run_dir / "log_knn.jsonl", iteration)

    model = dinokit.load(str(ckpt), which=which)
    base: dict[str, Any] = dict(getattr(model, "pretrained_cfg", {}))
    model.pretrained_cfg = {**base, **_training_preprocessing(cfg), **dict(pretrained_cfg or {})}  # type: ignore[assignment]

    train_info = {
        "which": which,
        "checkpoint": ckpt.name,
        "epochs_completed": int(state.get("epoch", 0)),
        "epochs_configured": cfg.optim.epochs,
        "iterations": iteration,
        "train_time_s": float(state.get("time_s", summary.get("train_time_s", 0.0)) or 0.0),
        "precision": state.get("precision", summary.get("precision")),
        "device": summary.get("device", cfg.device),
        "world_size": summary.get("world_size", 1),
        "images_per_s": summary.get("images_per_s"),
        "stopped": summary.get("stopped"),
        "hardware": hardware or _default_hardware(summary, cfg),
        "knn": dict(knn) if knn else None,
        "config": cfg.to_dict(),
    }
    metrics = {}
    if knn:
        metrics["knn_top1"] = float(knn["top1"])
        if knn.get("top5") is not None:
            metrics["knn_top5"] = float(knn["top5"])
    dataset = _dataset_name(cfg.data.source)
    card = _card_body(train_info, cfg, dataset, notes)
    return dinokit.save(model, folder, name=name, metrics=metrics or None, card=card,
                        extra_config={"dinokit_train": train_info}, dataset=dataset)


def _read_json_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _knn_record(path: Path, iteration: int) -> dict[str, Any] | None:
    """The log's k-NN record at ``iteration`` (else the last one before it); None without any."""
    from dinokit.training.plot import (
        read_log,  # the one JSON-lines reader (torn last line, resume duplicates)
    )

    if not path.is_file():
        return None
    records = [r for r in read_log(path) if "top1" in r and int(r.get("iteration", 0)) <= iteration]
    return records[-1] if records else None


def _training_preprocessing(cfg: Any) -> dict[str, Any]:
    """Eval preprocessing that matches training: the recipe's mean/std and global crop size."""
    from dinokit.data.fashion_mnist import is_fashion_mnist_spec

    size = int(cfg.data.global_crops_size)
    pcfg: dict[str, Any] = {"input_size": (3, size, size), "mean": tuple(cfg.data.mean), "std": tuple(cfg.data.std)}
    if is_fashion_mnist_spec(cfg.data.source):
        # 28x28 images centred on the object: resize to the crop size, no centre crop (as the k-NN monitor)
        pcfg.update(crop_pct=1.0, interpolation="bilinear")
    return pcfg


def _dataset_name(source: str) -> str:
    from dinokit.data.fashion_mnist import is_fashion_mnist_spec

    if is_fashion_mnist_spec(source):
        return "fashion_mnist"
    return Path(source.rstrip("/")).name or source


def _default_hardware(summary: Mapping[str, Any], cfg: Any) -> str:
    device = str(summary.get("device", cfg.device))
    world = int(summary.get("world_size", 1) or 1)
    return f"{device} x {world}" if world > 1 else device


def _card_body(info: Mapping[str, Any], cfg: Any, dataset: str, notes: str | None) -> str:
    import yaml

    d, o = cfg.data, cfg.optim
    minutes = info["train_time_s"] / 60.0
    knn = info.get("knn")
    lines = [
        "## Training", "",
        "| | |", "|---|---|",
        f"| method | DINO self-distillation ({info['which']} backbone exported) |",
        f"| data | `{d.source}`" + (f" (first {d.limit} images)" if d.limit else "") + f" ({dataset}) |",
        f"| crops | 2 x {d.global_crops_size} px global (scale {list(d.global_crops_scale)}) + "
        f"{d.local_crops_number} x {d.local_crops_size} px local (scale {list(d.local_crops_scale)}) |",
        f"| schedule | {info['epochs_completed']} of {o.epochs} epochs, {info['iterations']} iterations, "
        f"batch {o.batch_size_per_gpu} x {info['world_size']} |",
        f"| training time | {minutes:.1f} min ({info['train_time_s']:.0f} s)"
        + (f", stopped by {info['stopped']}" if info.get("stopped") else "") + " |",
        f"| hardware | {info['hardware']} ({info.get('precision') or 'fp32'}) |",
    ]
    if info.get("images_per_s"):
        lines.append(f"| throughput | {float(info['images_per_s']):.1f} images/s |")
    lines += ["", "## k-NN evaluation", ""]
    if knn:
        lines += [
            f"Weighted k-NN (k={knn.get('k', 20)}, T={knn.get('temperature', 0.07)}) on L2-normalised "
            f"{info['which']} features: **top-1 {float(knn['top1']):.2f}%**"
            + (f", top-5 {float(knn['top5']):.2f}%" if knn.get("top5") is not None else "")
            + (f" ({knn['n_train']} train images as memory, {knn['n_val']} test images)"
               if knn.get("n_train") else "") + ".",
        ]
    else:
        lines.append("Not measured for this run.")
    lines += ["", "## Recipe", "", "The resolved training config (`dinokit train` input):", "", "```yaml",
              yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```"]
    if notes:
        lines += ["", notes.strip()]
    lines += ["", f"Exported with dinokit on Python {platform.python_version()}."]
    return "\n".join(lines)
