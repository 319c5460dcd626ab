"""The DINO training loop: ``dinokit.train(config, out_dir)``.

One code path from a laptop CPU to ``torchrun`` on many GPUs. Per iteration (official order): set lr
and weight decay from the schedules, teacher forward on the 2 global views, student forward on all
views, DINO loss (updates the center), backward, per-tensor clipping, last-layer freeze, optimizer
step, EMA teacher update. Every iteration's randomness (augmentation, drop path) is seeded from
(seed, epoch, iteration), so ``resume=True`` continues a stopped run exactly.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinokit import distributed
from dinokit._io import write_json
from dinokit.models.head import DINOHead, MultiCropWrapper
from dinokit.training import checkpoint as ckpt_io
from dinokit.training.config import TrainConfig, load_config, require_source
from dinokit.training.data import TrainData, build_train_data, mix_seed
from dinokit.training.ema import ema_update_
from dinokit.training.loss import DINOLoss
from dinokit.training.optim import build_optimizer, cancel_last_layer_gradients, clip_gradients, set_schedules
from dinokit.training.schedules import cosine_schedule

log = logging.getLogger(__name__)

Progress = Callable[..., None]  # (done, total) or (done, total, stats)

# keys that may change between a run and its resume (they do not change the maths)
_RESUME_FREE = ("max_iterations", "max_minutes", "knn", "log_every", "checkpoint_every", "saveckp_freq",
                "num_threads", "device", "compile", "data.num_workers")


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------- models
def build_models(cfg: TrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop path) and teacher (none) with identical weights; the teacher gets no gradients."""
    from dinokit.models.backbone import create_backbone

    m = cfg.model
    args = dict(m.model_args)
    student_bb = create_backbone(m.arch, **args, drop_path_rate=m.drop_path_rate)
    teacher_bb = create_backbone(m.arch, **args)
    embed_dim = int(student_bb.num_features)

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


def load_init(student: nn.Module, teacher: nn.Module, source: str) -> str:
    """Initialise from an official/dinokit full checkpoint (both networks and heads) or a backbone source.

    Returns what was loaded ("full checkpoint" or "backbone").
    """
    from dinokit.hub import read_checkpoint
    from dinokit.models.convert import strip_prefix

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
    import dinokit

    backbone = dinokit.load(source)
    sd = backbone.state_dict()
    for net in (student, teacher):
        missing, unexpected = net.backbone.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: backbone does not fit model.arch/model_args "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return "backbone"


# ---------------------------------------------------------------- precision
def _autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def use_fused_attention(cfg: TrainConfig, device: torch.device, precision: str) -> bool | None:
    """The fused-attention setting for timm attention layers (None: leave timm's default)."""
    if cfg.model.fused_attn is not None:
        return cfg.model.fused_attn
    if device.type == "cpu" and precision == "bf16":
        return False
    return None


def set_fused_attention(model: nn.Module, enabled: bool | None) -> int:
    """Set ``fused_attn`` on every timm attention layer of ``model``; returns how many were set."""
    if enabled is None:
        return 0
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = bool(enabled)
            n += 1
    return n


def _step_time(student: nn.Module, teacher: nn.Module, crops: list[torch.Tensor], device: torch.device,
               precision: str, fused: bool | None = None, reps: int = 2) -> float:
    """Seconds per forward+backward of copies of the networks (the real ones are not touched)."""
    s, t = copy.deepcopy(student), copy.deepcopy(teacher)
    set_fused_attention(s, fused)
    set_fused_attention(t, fused)
    best = math.inf
    for r in range(reps + 1):
        t0 = time.perf_counter()
        with _autocast(device, precision):
            with torch.no_grad():
                t(crops[:2])
            out = s(crops)
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if r > 0:  # the first run warms up
            best = min(best, time.perf_counter() - t0)
        s.zero_grad(set_to_none=True)
    return best


def choose_precision(cfg: TrainConfig, device: torch.device, student: nn.Module, teacher: nn.Module,
                     crops: list[torch.Tensor]) -> str:
    """fp32/bf16/fp16 as configured; "auto": bf16 on CUDA, on CPU bf16 only when it measures faster."""
    if cfg.precision != "auto":
        if cfg.precision == "fp16" and device.type != "cuda":
            raise ValueError("precision: fp16 needs CUDA; use bf16 or fp32 on CPU")
        return cfg.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type != "cpu":
        return "fp32"
    t32 = _step_time(student, teacher, crops, device, "fp32", use_fused_attention(cfg, device, "fp32"))
    t16 = _step_time(student, teacher, crops, device, "bf16", use_fused_attention(cfg, device, "bf16"))
    choice = "bf16" if t16 < 0.95 * t32 else "fp32"
    log.info("precision auto: fp32 %.3f s/step, bf16 %.3f s/step -> %s", t32, t16, choice)
    return choice


# ---------------------------------------------------------------- k-NN monitor
class KNNMonitor:
    """Teacher-backbone features of a labeled train and val split, scored with the weighted k-NN vote."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        size = cfg.data.global_crops_size
        self.train = _labeled_split(cfg.knn.train_source or "", "train", size, cfg)
        self.val = _labeled_split(cfg.knn.val_source or "", "test", size, cfg)

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, precision: str) -> dict[str, Any]:
        from dinokit.eval.knn import knn_classify

        was_training = backbone.training
        backbone.eval()
        try:
            ftr = self._features(backbone, self.train[0], precision)
            fva = self._features(backbone, self.val[0], precision)
        finally:
            backbone.train(was_training)
        k = self.cfg.knn
        res = knn_classify(ftr, self.train[1], fva, self.val[1], k=k.k, T=k.temperature)
        return {"top1": float(res["top1"]), "top5": float(res["top5"]), "k": k.k, "temperature": k.temperature,
                "n_train": len(self.train[1]), "n_val": len(self.val[1])}

    def _features(self, backbone: nn.Module, images: Any, precision: str) -> torch.Tensor:
        feats = []
        bs = self.cfg.knn.batch_size
        fmt = torch.channels_last if is_convnet(backbone) and self.cfg.model.channels_last else torch.contiguous_format
        n = len(images)
        for i in range(0, n, bs):
            x = images[i:i + bs]
            x = _prepare_eval(x, self.cfg).to(self.device).contiguous(memory_format=fmt)
            with _autocast(self.device, precision):
                f = backbone(x)
            feats.append(nn.functional.normalize(f.float(), dim=1).cpu())
        return torch.cat(feats)


def _labeled_split(source: str, default_split: str, size: int, cfg: TrainConfig) -> tuple[Any, Any]:
    """(images, labels): a uint8 tensor (N, 1, 28, 28) for Fashion-MNIST, else a list of paths."""
    from dinokit.data.fashion_mnist import is_fashion_mnist_spec, load_spec

    if is_fashion_mnist_spec(source):
        x, y = load_spec(source, default_split)
        return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y)
    from dinokit.data.images import labeled_folder

    paths, labels, _ = labeled_folder(source)
    return _PathBatch(paths, size, cfg), torch.from_numpy(labels)


class _PathBatch:
    """Lazily decoded image files, sliced into eval-preprocessed tensors."""

    def __init__(self, paths: list[Path], size: int, cfg: TrainConfig) -> None:
        from dinokit.data.transforms import eval_transform

        self.paths = paths
        pcfg = {"mean": cfg.data.mean, "std": cfg.data.std}
        self.transform = eval_transform(pcfg, image_size=size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        from dinokit.data.images import ImageError, load_rgb

        out = []
        for p in self.paths[sl]:
            try:
                out.append(self.transform(load_rgb(p)))
            except ImageError as e:  # keep labels aligned: a black image stands in for an unreadable file
                log.warning("%s (k-NN monitor uses a blank image)", e)
                out.append(torch.zeros_like(out[-1]) if out else self.transform(_blank()))
        return torch.stack(out)


def _blank() -> Any:
    from PIL import Image

    return Image.new("RGB", (32, 32))


def _prepare_eval(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """uint8 (B, 1|3, H, W) -> normalized float (B, 3, S, S) at the global crop size; floats pass through."""
    if x.dtype != torch.uint8:
        return x
    size = cfg.data.global_crops_size
    y = x.float() / 255.0
    if y.shape[-1] != size or y.shape[-2] != size:
        y = nn.functional.interpolate(y, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    return (y - mean) / std


# ---------------------------------------------------------------- the loop
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.local_rank())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", distributed.local_rank())
    return dev


def _progress_wants_stats(progress: Progress | None) -> bool:
    if progress is None:
        return False
    try:
        params = inspect.signature(progress).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _check_resume_compatible(old: TrainConfig, new: TrainConfig, path: Path) -> None:
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == f or k.startswith(f + ".") for f in _RESUME_FREE)]
    if diff:
        raise ValueError(f"{path}: the run was started with a different config ({', '.join(diff[:5])}); "
                         "resume with the same recipe (only limits, logging, k-NN and device settings may change)")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model_args":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig | str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
          resume: bool = False, init: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Train a DINO model; write checkpoints and JSON-lines logs to ``out_dir``; return the summary.

    ``config``: a TrainConfig, a recipe path, or None with ``resume=True`` (the run's config.json).
    ``resume``: continue from ``out_dir/checkpoint.pth`` (exactly where it stopped).
    ``init``: start from an official/dinokit full checkpoint (student, teacher, heads) or any
    ``dinokit.load`` source (backbone only). ``progress(done, total)`` or
    ``progress(done, total, stats)`` is called after every iteration on rank 0 (stats: loss, lr,
    wd, teacher_temp, momentum, images_per_s, epoch).
    Raises TrainingDiverged on a NaN/inf loss (the last checkpoint is kept).
    """
    run_dir = Path(out_dir)
    ckpt_path = run_dir / ckpt_io.CHECKPOINT_NAME
    if config is None:
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"{run_dir / 'config.json'}: no config given and none in the run folder")
        config = TrainConfig.from_json((run_dir / "config.json").read_text(), str(run_dir / "config.json"))
    elif not isinstance(config, TrainConfig):
        config = load_config(config)
    cfg = config
    require_source(cfg)

    distributed.init_from_env()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    main = rank == 0
    device = _resolve_device(cfg.device)
    if cfg.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)

    state = None
    if resume and ckpt_path.is_file():
        state = ckpt_io.load_checkpoint(ckpt_path)
        _check_resume_compatible(TrainConfig.from_json(state["config"]), cfg, ckpt_path)
    elif resume:
        log.warning("%s: no checkpoint to resume from; starting a new run", ckpt_path)
    elif ckpt_path.is_file():
        raise ValueError(f"{ckpt_path}: the run folder already holds a run; continue it with resume=True "
                         "(--resume) or choose another output folder")

    torch.manual_seed(cfg.seed)
    student, teacher = build_models(cfg)
    if init is not None and state is None:
        what = load_init(student, teacher, init)
        log.info("initialised from %s (%s)", init, what)
    channels_last = cfg.model.channels_last and is_convnet(student.backbone)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student.to(device, memory_format=fmt)
    teacher.to(device, memory_format=fmt)
    student_m, teacher_m = student, teacher  # unwrapped modules: checkpoints, EMA, k-NN
    if world > 1 and is_convnet(student.backbone):
        student = distributed.sync_batchnorm(student)
        teacher = distributed.sync_batchnorm(teacher)
        student_m, teacher_m = student, teacher
    data: TrainData = build_train_data(cfg, device, rank, world, channels_last)
    ipe = data.iterations_per_epoch
    o = cfg.optim
    total_iters = o.epochs * ipe
    ncrops = 2 + cfg.data.local_crops_number
    loss_fn = DINOLoss(cfg.model.out_dim, ncrops, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                       cfg.loss.warmup_teacher_temp_epochs, o.epochs, cfg.loss.student_temp,
                       cfg.loss.center_momentum).to(device)
    optimizer = build_optimizer(student_m, o.optimizer)
    lr_schedule = cosine_schedule(o.lr * data.global_batch / 256.0, o.min_lr, o.epochs, ipe, o.warmup_epochs)
    wd_schedule = cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, ipe)
    momentum_schedule = cosine_schedule(o.momentum_teacher, 1.0, o.epochs, ipe)

    start_iter, time_before = 0, 0.0
    if state is not None:
        student_m.load_state_dict(state["student"])
        teacher_m.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        loss_fn.center.copy_(state["dino_loss"]["center"].to(device))
        ckpt_io.set_rng_state(state["rng"])
        start_iter = int(state["iteration"])
        time_before = float(state.get("time_s", 0.0))
        precision = str(state.get("precision", "fp32"))
        log.info("resumed %s at iteration %d (epoch %d)", ckpt_path, start_iter, start_iter // ipe)
    batches = data.batches(start_iter, total_iters)
    first = next(batches, None) if start_iter < total_iters else None
    if state is None:
        precision = choose_precision(cfg, device, student_m, teacher_m, first) if first is not None else "fp32"
        precision = str(distributed.broadcast_object(precision))
    fused = use_fused_attention(cfg, device, precision)
    if set_fused_attention(student_m, fused) + set_fused_attention(teacher_m, fused):
        log.info("timm fused attention %s", "on" if fused else "off")
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    if scaler is not None and state is not None and state.get("fp16_scaler"):
        scaler.load_state_dict(state["fp16_scaler"])
    if cfg.compile:
        student_m.backbone.compile()
        teacher_m.backbone.compile()
    student = distributed.wrap_ddp(student_m, device)
    teacher_params = list(teacher_m.parameters())
    student_params = list(student_m.parameters())
    teacher_bb_config = _backbone_config(teacher_m.backbone)
    config_json = cfg.to_json()
    monitor = KNNMonitor(cfg, device) if cfg.knn.train_source and main else None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config_json + "\n")
    log.info("training %s on %s: %d images, %d iterations/epoch x %d epochs, total batch %d, %d crops, %s",
             cfg.model.arch, device, data.num_samples, ipe, o.epochs, data.global_batch, ncrops, precision)

    def save(it: int, elapsed: float) -> None:
        if not main:
            return
        epoch_done = it // ipe
        ck = ckpt_io.make_checkpoint(
            student=student_m, teacher=teacher_m, optimizer=optimizer, epoch=epoch_done, iteration=it,
            center=loss_fn.center, config_json=config_json, backbone_config=teacher_bb_config, scaler=scaler,
            precision=precision, time_s=elapsed)
        ckpt_io.atomic_torch_save(ck, ckpt_path)
        if cfg.saveckp_freq and it % ipe == 0 and epoch_done % cfg.saveckp_freq == 0:
            ckpt_io.atomic_torch_save(ck, run_dir / ckpt_io.epoch_checkpoint_name(epoch_done))

    wants_stats = _progress_wants_stats(progress)
    t_start = time.perf_counter()
    win_t0, win_loss, win_n = time.perf_counter(), 0.0, 0
    ep_t0, ep_loss, ep_n = time.perf_counter(), 0.0, 0
    last_loss = math.nan
    stopped: str | None = None
    knn_last: dict[str, Any] | None = None
    it = start_iter
    rec: dict[str, Any] = {}
    pending = first
    while it < total_iters and pending is not None:
        crops = pending
        epoch = it // ipe
        set_schedules(optimizer, float(lr_schedule[it]), float(wd_schedule[it]))
        torch.manual_seed(mix_seed(cfg.seed, epoch, it, 4) + rank)  # drop path etc.: resumable
        with _autocast(device, precision):
            with torch.no_grad():
                teacher_out = teacher_m(crops[:2])
            student_out = student(crops)
        loss = loss_fn(student_out, teacher_out, epoch)
        loss_value = float(loss.item())
        if not math.isfinite(loss_value):
            where = str(ckpt_path) if ckpt_path.is_file() else "none written yet"
            raise TrainingDiverged(f"loss is {loss_value} at iteration {it} (epoch {epoch}); stopping. Last good "
                                   f"checkpoint: {where}. Try precision=fp32 or bf16, a lower optim.lr or "
                                   "a lower loss.teacher_temp")
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            if o.clip_grad:
                clip_gradients(student_m, o.clip_grad)
            cancel_last_layer_gradients(student_m, epoch, o.freeze_last_layer)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if o.clip_grad:
                scaler.unscale_(optimizer)
                clip_gradients(student_m, o.clip_grad)
            cancel_last_layer_gradients(student_m, epoch, o.freeze_last_layer)
            scaler.step(optimizer)
            scaler.update()
        m = float(momentum_schedule[it])
        ema_update_(teacher_params, student_params, m)
        it += 1
        pending = next(batches, None) if it < total_iters else None

        last_loss = loss_value
        win_loss += loss_value
        win_n += 1
        ep_loss += loss_value
        ep_n += 1
        elapsed = time_before + time.perf_counter() - t_start
        rec = {"epoch": epoch, "iteration": it, "lr": float(lr_schedule[it - 1]), "wd": float(wd_schedule[it - 1]),
               "teacher_temp": loss_fn.teacher_temp(epoch), "momentum": m}
        if main and (win_n >= cfg.log_every or it % ipe == 0):
            dt = time.perf_counter() - win_t0
            _append_jsonl(run_dir / "log_iter.jsonl", {
                **rec, "loss": win_loss / win_n, "images_per_s": win_n * data.global_batch / max(dt, 1e-9),
                "time_s": elapsed})
            win_t0, win_loss, win_n = time.perf_counter(), 0.0, 0
        if main and progress is not None:
            if wants_stats:
                ips = data.global_batch * ep_n / max(time.perf_counter() - ep_t0, 1e-9)
                progress(it, total_iters, {**rec, "loss": loss_value, "images_per_s": ips})
            else:
                progress(it, total_iters)

        if it % ipe == 0:  # end of an epoch
            t_ep_end = time.perf_counter()
            epochs_done = it // ipe
            ep_time = t_ep_end - ep_t0
            if main:
                _append_jsonl(run_dir / "log_epoch.jsonl", {
                    **{k: v for k, v in rec.items() if k != "epoch"}, "epoch": epochs_done, "loss": ep_loss / ep_n,
                    "images_per_s": ep_n * data.global_batch / max(ep_time, 1e-9),
                    "epoch_time_s": ep_time, "time_s": elapsed})
            if epochs_done % cfg.checkpoint_every == 0 or it == total_iters:
                save(it, elapsed)
            if monitor is not None and it < total_iters and cfg.knn.every_epochs and \
                    epochs_done % cfg.knn.every_epochs == 0:
                knn_last = _run_knn(monitor, teacher_m, precision, epochs_done, it, elapsed, run_dir)
            distributed.barrier()
            ep_t0, ep_loss, ep_n = time.perf_counter(), 0.0, 0
            win_t0 = time.perf_counter()

        stop = None
        if cfg.max_iterations is not None and it >= cfg.max_iterations:
            stop = "max_iterations"
        elif cfg.max_minutes is not None:
            over = torch.tensor([1.0 if elapsed >= cfg.max_minutes * 60 else 0.0])
            if world > 1:  # every rank must stop at the same iteration
                over = distributed.all_reduce_sum_(over.to(device)).cpu()
            if over.item() > 0:
                stop = "max_minutes"
        if stop is not None and it < total_iters:
            stopped = stop
            log.info("stopping at iteration %d (%s)", it, stop)
            if it % ipe != 0 or (it // ipe) % cfg.checkpoint_every != 0:
                save(it, elapsed)
            break

    elapsed = time_before + time.perf_counter() - t_start
    if start_iter >= total_iters:
        log.info("%s: training already complete (%d iterations)", ckpt_path, total_iters)
    if monitor is not None and (knn_last is None or knn_last["iteration"] != it):
        knn_last = _run_knn(monitor, teacher_m, precision, it // ipe, it, elapsed, run_dir)
    done_images = (it - start_iter) * data.global_batch
    summary = {
        "run_dir": str(run_dir), "checkpoint": str(ckpt_path), "epochs_completed": it // ipe, "iterations": it,
        "iterations_per_epoch": ipe, "final_loss": last_loss if math.isfinite(last_loss) else None, "stopped": stopped, "precision": precision,
        "device": str(device), "world_size": world,
        "images_per_s": done_images / max(time.perf_counter() - t_start, 1e-9), "train_time_s": elapsed,
        "knn": knn_last,
    }
    if main:
        write_json(run_dir / "summary.json", summary)
    distributed.barrier()
    return summary


def _run_knn(monitor: KNNMonitor, teacher: MultiCropWrapper, precision: str, epoch: int, it: int, elapsed: float,
             run_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    # eval batches have other shapes than training ones: run the compiled backbone eagerly, no recompiles
    eager = torch.compiler.set_stance("force_eager") if monitor.cfg.compile else nullcontext()
    with eager:
        res = monitor(teacher.backbone, precision)
    rec = {"epoch": epoch, "iteration": it, **res, "time_s": elapsed, "eval_time_s": time.perf_counter() - t0}
    _append_jsonl(run_dir / "log_knn.jsonl", rec)
    log.info("k-NN after epoch %d: top1 %.2f top5 %.2f", epoch, res["top1"], res["top5"])
    return rec


def _backbone_config(backbone: nn.Module) -> dict[str, Any]:
    from dinokit.models.backbone import backbone_config

    cfg = backbone_config(backbone)
    cfg.get("model_args", {}).pop("drop_path_rate", None)
    return cfg
