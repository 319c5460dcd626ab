"""The command line's shared contract: one error line, --debug tracebacks, quiet logs, --json stdout."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from dinokit.cli import app


def _run(args: list[str]) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, args)
    return res.exit_code, res.stdout, res.stderr


def test_a_bad_file_is_one_red_line_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code, out, err = _run(["convert", str(bad), "--out", str(tmp_path / "out")])
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.safetensors" in lines[0]
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"garbage")
    res = subprocess.run([sys.executable, "-m", "dinokit.cli", "--debug", "convert", str(bad), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_unavailable_device_is_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        return
    code, _, err = _run(["embed", "recipes/data/fashion-mnist-small/val/Bag", "--model", "models/fashion_mnist_dino",
                         "--out", str(tmp_path / "f.npz"), "--device", "cuda"])
    assert code == 1
    assert err.strip().splitlines() == [
        "error: --device cuda: no CUDA GPU is available on this machine; use --device cpu"]


def test_logs_are_quiet_by_default_and_info_with_v() -> None:
    from dinokit.cli._common import setup_logging

    setup_logging(0, debug=False)
    assert logging.getLogger("dinokit.embedding").getEffectiveLevel() == logging.WARNING
    setup_logging(1, debug=False)
    assert logging.getLogger("dinokit.embedding").getEffectiveLevel() == logging.INFO
    setup_logging(0, debug=True)
    assert logging.getLogger("dinokit").getEffectiveLevel() == logging.DEBUG
    setup_logging(0, debug=False)


def test_json_flag_prints_only_json(tmp_path: Path) -> None:
    data = Path("recipes/data/fashion-mnist-small")
    code, out, err = _run(["knn-eval", "--model", "models/fashion_mnist_dino", "--train", str(data / "val"),
                           "--val", str(data / "val"), "--k", "1", "--workers", "0", "--no-cache", "--json"])
    assert code == 0, err
    report = json.loads(out)  # stdout is exactly one JSON document
    # each val image is its own nearest neighbour in the train set (the same folder): 100%
    assert report["results"]["1"]["top1"] == 100.0 and report["num_val"] == 120


def test_every_command_explains_every_option() -> None:
    import typer

    group = typer.main.get_command(app)
    seen = 0

    def walk(cmd: object, path: str) -> None:
        nonlocal seen
        if hasattr(cmd, "commands"):  # a group (typer vendors click: duck-type it)
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")
            return
        seen += 1
        assert cmd.help and "Example" in cmd.help, f"{path}: --help has no example"
        for p in cmd.params:
            if p.param_type_name == "option" and not p.hidden:
                assert p.help, f"{path}: option {p.opts} has no help"

    walk(group, "dinokit")
    assert seen >= 16


def test_unreachable_hub_fails_at_once_with_the_cause(tmp_path: Path, monkeypatch) -> None:
    import socket

    import pytest

    import dinokit
    from dinokit.hub import hub_unreachable

    with socket.socket() as s:  # a loopback port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    hub_unreachable.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"^org/model: the HF Hub cannot be reached \(127\.0\.0\.1:"
                                                    r"\d+: .*HF_HUB_OFFLINE=1"):
            dinokit.load("org/model")
    finally:
        hub_unreachable.cache_clear()
