"""dinokit.training.plot: run logs (train_format.md layout) -> PNG with one panel per metric found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dinokit.training.plot import plot_run, read_log, series

PANEL_PX = 440  # 4.0 inches per panel at 110 dpi


def _write_jsonl(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    iters = [{"epoch": i // 4, "iteration": 10 * (i + 1), "loss": 9.0 - 0.1 * i, "lr": 1e-4 * (i + 1),
              "wd": 0.04, "teacher_temp": 0.04 + 0.001 * i, "momentum": 0.996, "images_per_s": 50.0,
              "time_s": 30.0 * (i + 1)} for i in range(8)]
    # a resume re-logs iterations 70 and 80 with other values; the last record per iteration must win
    resumed = [dict(iters[6], loss=1.5), dict(iters[7], loss=1.25)]
    _write_jsonl(run / "log_iter.jsonl", iters + resumed, tail='{"epoch": 2, "iterat')  # torn last line
    knn = [{"epoch": e, "iteration": 40 * e, "top1": 60.0 + 10 * e, "top5": 95.0, "k": 20, "temperature": 0.07,
            "n_train": 100, "n_val": 20, "time_s": 120.0 * e} for e in (1, 2)]
    _write_jsonl(run / "log_knn.jsonl", knn)
    return run


def test_read_log_dedups_resumed_iterations_and_skips_torn_tail(run_dir: Path) -> None:
    recs = read_log(run_dir / "log_iter.jsonl")
    assert [r["iteration"] for r in recs] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert [r["loss"] for r in recs][-2:] == [1.5, 1.25]
    xs, ys = series(recs, "teacher_temp", x="minutes")
    assert xs[:2] == [0.5, 1.0] and ys[-1] == pytest.approx(0.047)


def test_plot_run_writes_png_with_all_four_panels(run_dir: Path, tmp_path: Path) -> None:
    out = plot_run(run_dir, tmp_path / "figs" / "curves.png")
    assert out == tmp_path / "figs" / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.size[0] == 4 * PANEL_PX  # loss, lr, teacher temperature, k-NN
    assert not list(out.parent.glob(".*"))  # no temp file left behind


def test_plot_run_without_knn_draws_three_panels(run_dir: Path) -> None:
    (run_dir / "log_knn.jsonl").unlink()
    out = plot_run(run_dir, x="minutes")
    assert out == run_dir / "curves.png"
    with Image.open(out) as im:
        assert im.size[0] == 3 * PANEL_PX


def test_plot_run_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        plot_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no training log"):
        plot_run(tmp_path)
    (tmp_path / "log_iter.jsonl").write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match=r"log_iter\.jsonl: line 2 is not JSON"):
        plot_run(tmp_path)
