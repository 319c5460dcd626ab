#!/usr/bin/env bash
# CPU check: the speed rows of the "fast on every CPU" issue on this machine's CPU kind, in one go
# (about 15 minutes on 2 quiet cores; the machines change CPU between sessions, so run it on each kind):
#   1. training: dinokit's step vs the REAL official step (facebookresearch/dino's train_one_epoch),
#      Fashion-MNIST ViT config, with the fp32 GEMM peak of the same process (train_throughput.py);
#   2. k-NN, 60k x 384 vs 10k, against its matmul floor (knn.py);
#   3. `dinokit embed` against the bare model, every runtime this CPU offers (embed.py).
# CPU flags go first; every table names its command. Paste them into benchmarks/RESULTS.md with the date.
#
#   benchmarks/cpu_check.sh OFFICIAL_DINO_DIR            # the measurement
#   benchmarks/cpu_check.sh OFFICIAL_DINO_DIR --cap-avx2 # the same with ATen, oneDNN, MKL and numba capped to AVX2
#   benchmarks/cpu_check.sh OFFICIAL_DINO_DIR --quick    # a dry run of the plumbing (tiny sizes, ~3 minutes)
#   benchmarks/cpu_check.sh OFFICIAL_DINO_DIR --vits16   # also ViT-S/16 with the official crops (+10 minutes)
#
# OFFICIAL_DINO_DIR holds the *.py files of a facebookresearch/dino snapshot, read at run time and never
# committed: `git --git-dir=<fetched mirror> archive HEAD main_dino.py utils.py vision_transformer.py | tar -x -C DIR`.
# Environment: PYTHON (default .venv/bin/python, else python3), THREADS (default 2).
source "$(dirname "$0")/_env.sh"  # strict mode, cd to the repository root, ROOT, PY, PYTHONPATH
THREADS=${THREADS:-2}

OFFICIAL=${1:-}
if [ -z "$OFFICIAL" ] || [ ! -f "$OFFICIAL/main_dino.py" ]; then
  echo "cpu_check.sh: first argument must be a folder with facebookresearch/dino's main_dino.py (usage: the comment at the top of this script)" >&2
  exit 2
fi
shift
QUICK=0; VITS16=0
for arg in "$@"; do
  case "$arg" in
    --cap-avx2)
      # the libraries' own switches: the instruction set of an AVX2-only CPU (not its caches or clocks)
      export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 NUMBA_CPU_NAME=haswell ;;
    --quick) QUICK=1 ;;
    --vits16) VITS16=1 ;;
    *) echo "cpu_check.sh: unknown option $arg (expected --cap-avx2, --quick, --vits16)" >&2; exit 2 ;;
  esac
done

run() {  # echo the command, then run it
  echo; echo "\$ $*"; "$@"
}

date -u '+%Y-%m-%d %H:%M UTC'
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') ($(nproc) cores)"
echo "flags: $(grep -o -E 'avx512_bf16|amx_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
[ -n "${ATEN_CPU_CAPABILITY:-}" ] && echo "capped to AVX2: ATEN_CPU_CAPABILITY ONEDNN_MAX_CPU_ISA MKL_ENABLE_INSTRUCTIONS NUMBA_CPU_NAME"
"$PY" -c "from dinokit.devices import cpu_has_native_bf16 as f; print('native bf16 (dinokit):', f())"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

if [ "$QUICK" = 1 ]; then
  run "$PY" benchmarks/train_throughput.py --config tiny --official-repo "$OFFICIAL" \
    --modes official,dinokit,dinokit-fp32 --iters 1 --rounds 1 --threads "$THREADS" --profile
  run "$PY" benchmarks/knn.py --repeat 1 --threads "$THREADS" --no-sklearn --methods dinokit,official-style
  run "$PY" benchmarks/embed.py --images 32 --batch-size 16 --rounds 1 --threads "$THREADS"
else
  run "$PY" benchmarks/train_throughput.py --config fmnist --official-repo "$OFFICIAL" \
    --modes official,dinokit,dinokit-fp32 --iters 3 --rounds 2 --threads "$THREADS" --profile
  if [ "$VITS16" = 1 ]; then
    run "$PY" benchmarks/train_throughput.py --config vits16 --official-repo "$OFFICIAL" \
      --modes official,dinokit --iters 2 --rounds 1 --threads "$THREADS" --profile
  fi
  run "$PY" benchmarks/knn.py --repeat 2 --threads "$THREADS" --no-sklearn --profile
  run "$PY" benchmarks/embed.py --images 384 --batch-size 64 --rounds 3 --threads "$THREADS"
fi
echo; echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
