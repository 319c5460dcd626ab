#!/usr/bin/env bash
# GPU check for a session that has a CUDA device (about 8 minutes on one H100):
#   1. the official ViT-S/16 training step (recipes/dino_vits16_in1k.yaml: 2x224 + 8x96 crops,
#      out_dim 65536, batch 64, bf16 autocast, AdamW, clip, EMA, GPU tensor augmentation) timed
#      eager and with torch.compile: images/s and peak GPU memory;
#   2. recipes/fashion_mnist_cpu.yaml trained for 5 minutes on the GPU, then the teacher's
#      weighted k-NN (k=20, T=0.07, 60k train memory, 10k test).
#   3. embedding images/s (`embed()`, ViT-S/16 and ViT-B/14 at 224 px, bf16 auto) with JPEGs decoded by
#      Pillow in CPU workers vs on the GPU (nvJPEG via decode="device"): benchmarks/scale.py --decode-check.
# Every result is one JSON line appended to RESULTS (default: $OUT/gpu_check.jsonl, or
# benchmarks/_work/gpu_check.jsonl without $OUT). Paper reference: ~92 images/s per V100 with
# 2x224 + 10x96 crops at 15.4 GB.
#
#   benchmarks/gpu_check.sh [RESULTS.jsonl]          # on the GPU machine
#   benchmarks/gpu_check.sh --cpu [RESULTS.jsonl]    # dry run on the CPU (tiny sizes, < 2 minutes)
#
# Environment: PYTHON (default .venv/bin/python, else python3), ITERS (timed steps, default 20),
# FM_MINUTES (Fashion-MNIST budget, default 5). The repository root goes on PYTHONPATH, so an
# environment with torch, timm and the other dependencies is enough (no install needed).
source "$(dirname "$0")/_env.sh"  # strict mode, cd to the repository root, ROOT, PY, PYTHONPATH

MODE=gpu
if [ "${1:-}" = "--cpu" ] || [ "${1:-}" = "--dry" ]; then MODE=cpu; shift; fi
RESULTS=${1:-${OUT:-$ROOT/benchmarks/_work}/gpu_check.jsonl}
mkdir -p "$(dirname "$RESULTS")"
WORK="$(dirname "$RESULTS")/gpu_check_work"
rm -rf "$WORK" && mkdir -p "$WORK"
if [ "$MODE" = gpu ]; then
  ITERS=${ITERS:-20}; FM_MINUTES=${FM_MINUTES:-5}; FM_EVAL_LIMIT=""
  FM_SETS=(--set device=cuda)
else
  ITERS=${ITERS:-2}; FM_MINUTES=${FM_MINUTES:-0.3}; FM_EVAL_LIMIT="--eval-limit 2000"
  FM_SETS=(--set device=cpu)
fi
echo "gpu_check: mode=$MODE python=$PY results=$RESULTS" >&2

# ---------------------------------------------------------------- 1. ViT-S/16 step: eager vs compiled
for COMPILE in 0 1; do
  "$PY" - "$MODE" "$COMPILE" "$ITERS" "$RESULTS" <<'PY'
import json, sys, time

import torch

mode, compile_, iters, results = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
from dinokit.data.multicrop import MultiCropSpec, TensorMultiCrop
from dinokit.training.config import load_config
from dinokit.training.ema import ema_update_
from dinokit.training.loop import build_models
from dinokit.training.loss import DINOLoss
from dinokit.training.optim import build_optimizer, cancel_last_layer_gradients, clip_gradients, set_schedules

cfg = load_config("recipes/dino_vits16_in1k.yaml")
if mode == "cpu":  # dry run: same code path, tiny sizes
    cfg = cfg.replace({"model.out_dim": 1024, "model.model_args": {"depth": 2}, "optim.batch_size_per_gpu": 2,
                       "data.global_crops_size": 64, "data.local_crops_size": 32, "data.local_crops_number": 2})
dev = torch.device("cuda" if mode == "gpu" else "cpu")
if mode == "gpu":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
torch.manual_seed(0)
student, teacher = build_models(cfg)
student.to(dev)
teacher.to(dev)
if compile_:
    # inductor on the GPU; the CPU dry run only checks the plumbing (no C++ toolchain needed)
    backend = "inductor" if mode == "gpu" else "eager"
    student.backbone.compile(backend=backend)
    teacher.backbone.compile(backend=backend)
b, d = cfg.optim.batch_size_per_gpu, cfg.data
ncrops = 2 + d.local_crops_number
loss_fn = DINOLoss(cfg.model.out_dim, ncrops, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                   cfg.loss.warmup_teacher_temp_epochs, cfg.optim.epochs).to(dev)
opt = build_optimizer(student, cfg.optim.optimizer)
set_schedules(opt, cfg.optim.lr * b / 256, cfg.optim.weight_decay)
aug = TensorMultiCrop(MultiCropSpec.from_config(d))
gen = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (b, 3, 256, 256), dtype=torch.uint8, generator=gen).to(dev)
sp, tp = list(student.parameters()), list(teacher.parameters())
amp = torch.autocast(dev.type, dtype=torch.bfloat16)


def step() -> float:
    crops = aug(images, gen)
    with amp:
        with torch.no_grad():
            t_out = teacher(crops[:2])
        s_out = student(crops)
    loss = loss_fn(s_out.float(), t_out.float(), 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(student, cfg.optim.clip_grad)
    cancel_last_layer_gradients(student, 1, cfg.optim.freeze_last_layer)
    opt.step()
    ema_update_(tp, sp, cfg.optim.momentum_teacher)
    return float(loss.item())


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


t0 = time.perf_counter()
for _ in range(3 if mode == "gpu" else 1):  # warm-up (and compilation)
    step()
sync()
warm_s = time.perf_counter() - t0
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for _ in range(iters):
    loss = step()
sync()
dt = time.perf_counter() - t0
rec = {"check": "vits16_step", "mode": mode, "compile": compile_, "precision": "bf16", "batch": b,
       "crops": f"2x{d.global_crops_size}+{d.local_crops_number}x{d.local_crops_size}", "out_dim": cfg.model.out_dim,
       "iters": iters, "images_per_s": iters * b / dt, "s_per_iter": dt / iters, "warmup_s": warm_s, "loss": loss,
       "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
       "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
with open(results, "a") as f:
    f.write(json.dumps(rec) + "\n")
print(json.dumps(rec))
PY
done

# ---------------------------------------------------------------- 2. Fashion-MNIST recipe for FM_MINUTES
"$PY" benchmarks/fashion_mnist.py --minutes "$FM_MINUTES" --eval-every "$FM_MINUTES" $FM_EVAL_LIMIT \
  --out "$WORK/fashion_mnist" --no-export --no-results --png "$WORK/fashion_mnist_knn.png" \
  "${FM_SETS[@]}" --set knn.train_source=null --set knn.val_source=null --set num_threads=null \
  > "$WORK/fashion_mnist.out" 2> "$WORK/fashion_mnist.err" || { tail -20 "$WORK/fashion_mnist.err" >&2; exit 1; }
"$PY" - "$WORK/fashion_mnist.out" "$RESULTS" "$MODE" <<'PY'
import json, sys

final = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
s = final["summary"]
rec = {"check": "fashion_mnist", "mode": sys.argv[3], "recipe": "recipes/fashion_mnist_cpu.yaml",
       "minutes": final["minutes"], "iterations": final["iterations"], "knn_top1": final["final_top1"],
       "knn_top5": final["final_top5"], "images_per_s": s.get("images_per_s"), "device": s.get("device"),
       "precision": s.get("precision"), "stopped": s.get("stopped")}
with open(sys.argv[2], "a") as f:
    f.write(json.dumps(rec) + "\n")
print(json.dumps(rec))
PY
# ---------------------------------------------------------------- 3. embedding: decode in workers vs on the GPU
if [ "$MODE" = gpu ]; then EMB=(--device cuda --images 2048 --batch-size 256); else EMB=(--device cpu --images 16 --batch-size 8); fi
"$PY" benchmarks/scale.py --decode-check "${EMB[@]}" | tee -a "$RESULTS"
echo "gpu_check: done; results in $RESULTS" >&2
