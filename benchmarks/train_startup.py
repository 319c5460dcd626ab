"""Start-up cost of `dinokit train`: wall time of the whole command minus the training time it reports.

Runs the demo recipe for 3 iterations on the small PNG folder (the command of issue 14) a few times,
each in a fresh run folder, and prints one JSON line per run: wall seconds, ``train_time_s`` from
summary.json (which includes the precision probe: it counts in max_minutes), the difference (imports,
model and data set-up, checkpoint writes, shutdown), the precision chosen and the 1-minute load average.

    .venv/bin/python benchmarks/train_startup.py --runs 3
    git archive OLD_COMMIT dinokit recipes | tar -x -C /tmp/old      # an older dinokit, measured in place:
    .venv/bin/python benchmarks/train_startup.py --checkout /tmp/old
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

from dinokit.devices import cpu_vector_extensions

REPO = Path(__file__).resolve().parent.parent
COMMAND = ["train", "recipes/fashion_mnist_vit_cpu.yaml", "--set", "data.source=recipes/data/fashion-mnist-small/train",
           "--set", "max_iterations=3"]


def one_run(checkout: Path, out: Path) -> dict[str, object]:
    # run inside the checkout: `python -m` puts the working folder first on sys.path
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dinokit.cli", *COMMAND, "--out", str(out)], cwd=checkout, env=env,
                         capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"dinokit train failed:\n{res.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    train_s = float(summary["train_time_s"])
    return {"wall_s": round(wall, 2), "train_time_s": round(train_s, 2), "outside_s": round(wall - train_s, 2),
            "precision": summary["precision"], "load_1min_before": round(load, 2),
            "precision_log": [ln.strip() for ln in res.stderr.splitlines() if "precision auto" in ln][-1:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--checkout", type=Path, default=REPO, help="the dinokit checkout (with recipes/) to measure")
    args = p.parse_args()
    print(json.dumps({"cpu_flags": cpu_vector_extensions(), "cores": os.cpu_count(), "dinokit": str(args.checkout)}))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            print(json.dumps(one_run(args.checkout.resolve(), Path(tmp) / f"run{i}")), flush=True)


if __name__ == "__main__":
    main()
