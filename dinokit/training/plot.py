"""Training curves to PNG: loss, learning rate, teacher temperature and k-NN from a run's JSON-lines log.

The log is one JSON object per line (see the run-dir layout in the trainer). Each panel is drawn
only when its metric appears in the log, so a run without k-NN evaluation still gets its loss,
lr and temperature curves. matplotlib's Agg backend is used: no display is needed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dinokit._io import atomic_path

logger = logging.getLogger(__name__)

# (panel title, log file, key); a panel is drawn when its file holds the key (see train_format.md)
PANELS: tuple[tuple[str, str, str], ...] = (
    ("loss", "log_iter.jsonl", "loss"),
    ("learning rate", "log_iter.jsonl", "lr"),
    ("teacher temperature", "log_iter.jsonl", "teacher_temp"),
    ("k-NN top-1 (%)", "log_knn.jsonl", "top1"),
)
LOG_FILES: tuple[str, ...] = ("log_iter.jsonl", "log_epoch.jsonl", "log_knn.jsonl")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines log; blank lines are skipped, a torn last line (killed run) is ignored.

    After a resume a log can repeat iterations: the last record per ``iteration`` wins.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                logger.warning("%s: ignoring a torn last line", path)
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON ({exc.msg})") from exc
        if isinstance(rec, dict):
            records.append(rec)
    if all("iteration" in r for r in records):
        last = {r["iteration"]: r for r in records}  # dict keeps the first position, takes the last value
        records = sorted(last.values(), key=lambda r: r["iteration"])
    return records


def read_run_logs(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """{log file name: records} for the run's JSON-lines logs that exist; FileNotFoundError without any."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    logs = {name: read_log(run_dir / name) for name in LOG_FILES if (run_dir / name).is_file()}
    if not logs:
        raise FileNotFoundError(f"{run_dir}: no training log (expected {', '.join(LOG_FILES)})")
    return logs


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def series(records: Iterable[dict[str, Any]], key: str, x: str = "iteration") -> tuple[list[float], list[float]]:
    """(xs, ys) of the finite ``key`` values; ``x`` is "iteration" or "minutes" (from ``time_s``)."""
    xs: list[float] = []
    ys: list[float] = []
    for rec in records:
        y = _number(rec.get(key))
        xv = _number(rec.get("time_s")) if x == "minutes" else _number(rec.get("iteration"))
        if y is None or xv is None:
            continue
        xs.append(xv / 60.0 if x == "minutes" else xv)
        ys.append(y)
    return xs, ys


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, x: str = "iteration",
             title: str | None = None) -> Path:
    """Draw the run's curves (one panel per metric found) to ``out`` (default RUN_DIR/curves.png).

    ``x`` is "iteration" or "minutes" (training time). Returns the PNG path. Raises
    FileNotFoundError without a log and ValueError when the logs hold none of the metrics.
    """
    if x not in ("iteration", "minutes"):
        raise ValueError(f"x={x!r}: expected 'iteration' or 'minutes'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    logs = read_run_logs(run_dir)
    panels = []
    for name, file, key in PANELS:
        xs, ys = series(logs.get(file, []), key, x)
        if xs:
            panels.append((name, xs, ys))
    if not panels:
        raise ValueError(f"{run_dir}: the logs hold no loss, lr, teacher temperature or k-NN values")
    out = Path(out) if out is not None else run_dir / "curves.png"

    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.3), squeeze=False)
    for ax, (name, xs, ys) in zip(axes[0], panels, strict=True):
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, lw=1.5)
        ax.set_title(name)
        ax.set_xlabel("training minutes" if x == "minutes" else "iteration")
        ax.grid(alpha=0.3)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(title or run_dir.resolve().name)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    logger.info("wrote %s (%d panels)", out, len(panels))
    return out


def save_figure(fig: Any, out: str | Path) -> None:
    """Save a matplotlib figure as PNG atomically (temp file in the same folder, then os.replace)."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
