"""Start-up cost of `dinokit train`: wall time of the whole command minus the training time it reports.

Runs the demo recipe for 3 iterations on the small PNG folder (the command of issue 14) a few times,
each in a fresh run folder, and prints one JSON line per run: wall seconds, ``train_time_s`` from
summary.json (which includes the precision probe: it counts in max_minutes), the difference (imports,
model and data set-up, checkpoint writes, shutdown), the precision chosen and the 1-minute load average.

    .venv/bin/python benchmarks/train_startup.py --runs 3
    .venv/bin/python benchmarks/train_startup.py --pythonpath /tmp/old_checkout   # an older dinokit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMAND = ["train", "recipes/fashion_mnist_vit_cpu.yaml", "--set", "data.source=recipes/data/fashion-mnist-small/train",
           "--set", "max_iterations=3"]


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def one_run(pythonpath: str, out: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dinokit.cli", *COMMAND, "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"dinokit train failed:\n{res.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    train_s = float(summary["train_time_s"])
    return {"wall_s": round(wall, 2), "train_time_s": round(train_s, 2), "outside_s": round(wall - train_s, 2),
            "precision": summary["precision"], "load_1min_before": round(load, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--pythonpath", default=str(REPO), help="the dinokit checkout to measure")
    args = p.parse_args()
    print(json.dumps({"cpu_flags": cpu_flags(), "cores": os.cpu_count(), "dinokit": args.pythonpath}))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            print(json.dumps(one_run(args.pythonpath, Path(tmp) / f"run{i}")), flush=True)


if __name__ == "__main__":
    main()
