"""Torture suite, kills: every writing command SIGKILLed at random moments and at the injected
points between its fsyncs and renames; the output must always load as the old or the new state.

Writers run in forked children (the parent has imported torch once, so a child starts in
milliseconds); the parent kills them after a random delay, or ``DINOKIT_CRASH_AT`` (read at call
time) makes the child kill itself at a named point. Two models of different depth make any mix of
old and new files fail to load, so a mixed folder cannot pass as "old". The mutation tests at the
end put back a one-file-at-a-time replacement and a switch without recovery, and show the same
check catches them. ``DINOKIT_TORTURE_KILLS`` (default 5) sets the random kills per command.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import dinokit
from dinokit import _io
from dinokit.hub import CheckpointError

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")]

X = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
KILLS = int(os.environ.get("DINOKIT_TORTURE_KILLS", "5"))
FOLDER_POINTS = ["folder:ready", "folder:switched"]
FALLBACK_POINTS = ["folder:ready", "folder:aside", "folder:switched"]
FILE_POINTS = ["file:synced", "file:renamed"]
KILL_LOG: dict[str, int] = {}  # command -> kills done, printed for RESULTS.md with -s


def tiny(depth: int, seed: int) -> torch.nn.Module:
    from conftest import make_tiny_vit

    return make_tiny_vit(seed=seed, depth=depth, embed_dim=64, num_heads=1)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"A": tiny(1, 0), "B": tiny(2, 1)}


@pytest.fixture(scope="module")
def outputs(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: m(X) for k, m in models.items()}


# ------------------------------------------------------------------ the harness
def run_child(op: Callable[[], None], *, delay: float | None = None, crash_at: str | None = None,
              timeout: float = 60.0) -> str:
    """Run ``op`` in a forked child; kill it after ``delay`` s (or at ``crash_at``). -> killed|finished."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            torch.set_num_threads(1)
            if crash_at:
                os.environ[_io.CRASH_ENV] = crash_at
            else:
                os.environ.pop(_io.CRASH_ENV, None)
            op()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 3
        os._exit(code)
    if delay is not None:
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"writer did not finish in {timeout} s")
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        return "killed"
    assert os.WEXITSTATUS(status) == 0, "the writer failed with an exception (see stderr)"
    return "finished"


def timed(op: Callable[[], None]) -> float:
    t = time.monotonic()
    assert run_child(op) == "finished"
    return time.monotonic() - t


def torture(name: str, write: Callable[[str], None], state: Callable[[], str], points: list[str],
            n_random: int = KILLS, seed: int = 0) -> list[str]:
    """Kill ``write(target)`` at each injected point and at random moments; after each kill
    ``state()`` must be the old or the new version ("A"/"B"). Returns the verdicts."""
    rng = random.Random(seed)
    current = state()
    duration = timed(lambda: write("B" if current == "A" else "A"))
    current = state()
    verdicts = []
    plan = [("point", p) for p in points] + [("random", rng.uniform(0.0, 1.2 * duration)) for _ in range(n_random)]
    for kind, arg in plan:
        target = "B" if current == "A" else "A"
        if kind == "point":
            outcome = run_child(lambda t=target: write(t), crash_at=str(arg))
            assert outcome == "killed", f"{name}: never reached {arg}"
        else:
            run_child(lambda t=target: write(t), delay=float(arg))
        got = state()
        verdicts.append(got)
        assert got in (current, target), f"{name}: after a kill ({kind} {arg}) the output is {got}"
        current = got
    if not name.startswith("mutant"):
        KILL_LOG[name] = KILL_LOG.get(name, 0) + len(plan)
    return verdicts


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def folder_state(folder: Path, outputs: dict[str, torch.Tensor]) -> str:
    """"A" or "B" when ``folder`` loads as that model (same outputs), else "bad: why"."""
    try:
        model = dinokit.load(folder)
        with torch.no_grad():
            y = model(X)
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:
        return f"bad: {type(e).__name__}: {str(e)[:160]}"
    for k, ref in outputs.items():
        if y.shape == ref.shape and torch.equal(y, ref):
            return k
    return "bad: outputs match neither model"


@contextlib.contextmanager
def no_exchange() -> Iterator[None]:
    """Take the two-rename path of the folder switch (as on filesystems without renameat2)."""
    def refuse(a: Path, b: Path) -> None:
        raise OSError(errno.EINVAL, "exchange not supported")

    real, _io._exchange = _io._exchange, refuse
    try:
        yield
    finally:
        _io._exchange = real


# ------------------------------------------------------------------ writing commands
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_kill_save_into_existing_folder(tmp_path: Path, models: dict, outputs: dict, exchange: bool) -> None:
    folder = tmp_path / "model"
    dinokit.save(models["A"], folder)
    (folder / "notes.md").write_text("the user's own file")
    ctx = contextlib.nullcontext() if exchange else no_exchange()
    with ctx:
        verdicts = torture(f"save ({'renameat2' if exchange else 'two renames'})",
                           lambda t: dinokit.save(models[t], folder), lambda: folder_state(folder, outputs),
                           FOLDER_POINTS if exchange else FALLBACK_POINTS)
        dinokit.save(models["A"], folder)  # a clean run after the kills
    assert set(verdicts) <= {"A", "B"} and _leftovers(folder) == []
    assert (folder / "notes.md").read_text() == "the user's own file"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_kill_index_save_over_an_existing_index(tmp_path: Path, exchange: bool) -> None:
    """Index.save into an existing index folder (issue 16: a kill between its two renames left no
    index at the path): after every kill the folder loads as the old or the new index."""
    from dinokit.retrieval import Index

    g = torch.Generator().manual_seed(0)
    vecs = {k: torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1) for k, n in (("A", 30), ("B", 50))}
    folder = tmp_path / "idx"
    Index.from_features(vecs["A"], [f"a{i}.png" for i in range(30)]).save(folder)

    def write(which: str) -> None:
        n = len(vecs[which])
        with contextlib.nullcontext() if exchange else no_exchange():
            Index.from_features(vecs[which], [f"{which.lower()}{i}.png" for i in range(n)]).save(folder)

    def state() -> str:
        try:
            index = Index.load(folder)
            count, first = index.count, index.get(0)["path"]
        except (OSError, ValueError, KeyError) as e:
            return f"bad: {type(e).__name__}: {str(e)[:160]}"
        return {(30, "a0.png"): "A", (50, "b0.png"): "B"}.get((count, Path(first).name), f"bad: {count} {first}")

    torture(f"Index.save ({'renameat2' if exchange else 'two renames'})", write, state,
            FOLDER_POINTS if exchange else FALLBACK_POINTS)
    assert _leftovers(folder) == []


def test_kill_convert(tmp_path: Path, models: dict, outputs: dict) -> None:
    src = {}
    for k, m in models.items():  # official backbone-only .pth files
        src[k] = tmp_path / f"{k}.pth"
        torch.save(m.state_dict(), src[k])
    folder = tmp_path / "converted"
    dinokit.save(dinokit.load(src["A"]), folder)
    torture("convert", lambda t: dinokit.save(dinokit.load(src[t]), folder), lambda: folder_state(folder, outputs),
            FOLDER_POINTS, seed=1)
    dinokit.save(dinokit.load(src["B"]), folder)
    assert _leftovers(folder) == [] and folder_state(folder, outputs) == "B"


def _run_folder(root: Path, model: torch.nn.Module) -> Path:
    """A minimal dinokit training run folder holding ``model`` as teacher and student."""
    from dinokit.models.backbone import backbone_config
    from dinokit.training.config import TrainConfig

    run = root / f"run{len(list(root.glob('run*')))}"
    run.mkdir()
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    cfg = TrainConfig().replace({"data.source": "images/", "optim.epochs": 1, "optim.warmup_epochs": 0})
    torch.save({"student": sd, "teacher": sd, "optimizer": {}, "epoch": 1, "iteration": 4,
                "config": cfg.to_json(), "backbone_config": json.dumps(backbone_config(model)),
                "precision": "fp32", "time_s": 1.0}, run / "checkpoint.pth")
    return run


def test_kill_export(tmp_path: Path, models: dict, outputs: dict) -> None:
    from dinokit.publish import export

    runs = {k: _run_folder(tmp_path, m) for k, m in models.items()}
    folder = tmp_path / "exported"
    export(runs["A"], folder)
    torture("export", lambda t: export(runs[t], folder) and None, lambda: folder_state(folder, outputs),
            FOLDER_POINTS, seed=2)


def test_kill_embed_out_file(tmp_path: Path) -> None:
    from dinokit.embedding import Embeddings, load_embeddings

    rows = 20_000  # 5 MB: random kills land inside the write, not only before or after it
    feats = {k: torch.full((rows, 64), float(i)) for i, k in enumerate("AB")}
    names = {k: [f"{k}{i}.png" for i in range(rows)] for k in "AB"}
    out = tmp_path / "features.npz"
    Embeddings(feats["A"], names["A"]).save(out)

    def state() -> str:
        try:
            emb = load_embeddings(out)
        except ValueError as e:
            return f"bad: {e}"
        for k in "AB":
            if torch.equal(emb.features, feats[k]) and emb.paths == names[k]:
                return k
        return "bad: mixed content"

    torture("embed --out", lambda t: Embeddings(feats[t], names[t]).save(out) and None, state, FILE_POINTS, seed=3)
    Embeddings(feats["A"], names["A"]).save(out)
    assert _leftovers(out) == []  # the killed runs' temp files are gone after the next write


def test_kill_training_checkpoint_write(tmp_path: Path) -> None:
    from dinokit.training.checkpoint import atomic_torch_save

    big = {k: {"iteration": i, "w": torch.full((1_000_000,), float(i))} for i, k in enumerate("AB")}
    path = tmp_path / "checkpoint.pth"
    atomic_torch_save(big["A"], path)

    def state() -> str:
        try:
            obj = torch.load(path, weights_only=True)
        except Exception as e:
            return f"bad: {type(e).__name__}"
        k = "AB"[obj["iteration"]]
        return k if torch.equal(obj["w"], big[k]["w"]) else "bad: mixed content"

    torture("training checkpoint", lambda t: atomic_torch_save(big[t], path), state, FILE_POINTS, seed=4)
    atomic_torch_save(big["B"], path)
    assert _leftovers(path) == []


def test_cli_convert_killed_at_the_switch_loads_old_or_new(tmp_path: Path, models: dict, outputs: dict) -> None:
    """The crash hook reaches the real command: `dinokit convert` killed right after its switch
    (one subprocess: a CLI start costs seconds; the forked kills above cover the rest)."""
    folder = tmp_path / "m"
    dinokit.save(models["A"], folder)
    torch.save(models["B"].state_dict(), tmp_path / "b.pth")
    env = {**os.environ, _io.CRASH_ENV: "folder:switched", "PYTHONPATH": str(Path(__file__).parents[1]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dinokit.cli", "convert", str(tmp_path / "b.pth"), "--out",
                           str(folder)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-500:]
    assert len(_leftovers(folder)) == 1  # the old folder, not yet removed when the kill came
    assert folder_state(folder, outputs) == "B" and _leftovers(folder) == []  # the load cleaned it up


# ------------------------------------------------------------------ mutation checks
def _naive_folder(folder: Any, *, keep_existing: bool = False) -> Any:
    """The replacement dinokit.save used before: files moved over the old ones one at a time."""
    @contextlib.contextmanager
    def cm() -> Iterator[Path]:
        staging = Path(folder).parent / ".naive-staging"
        staging.mkdir(exist_ok=True)
        yield staging
        Path(folder).mkdir(exist_ok=True)
        for f in sorted(staging.iterdir()):  # config.json first, model.safetensors last
            os.replace(f, Path(folder) / f.name)
            _io.crash_point("naive:between")
        staging.rmdir()

    return cm()


def test_mutation_one_file_at_a_time_is_caught(tmp_path: Path, models: dict, outputs: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dinokit.hub.atomic_folder", _naive_folder)
    folder = tmp_path / "model"
    dinokit.save(models["A"], folder)
    with pytest.raises(AssertionError, match="the output is bad"):
        torture("mutant: naive save", lambda t: dinokit.save(models[t], folder),
                lambda: folder_state(folder, outputs), ["naive:between#2"], n_random=0)


def test_mutation_switch_without_recovery_is_caught(tmp_path: Path, models: dict, outputs: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "recover_folder", lambda folder: None)
    monkeypatch.setattr("dinokit.hub.recover_folder", lambda folder: None)
    folder = tmp_path / "model"
    dinokit.save(models["A"], folder)
    with no_exchange(), pytest.raises(AssertionError, match="the output is bad"):
        torture("mutant: no recovery", lambda t: dinokit.save(models[t], folder),
                lambda: folder_state(folder, outputs), ["folder:aside"], n_random=0)


def test_zz_report_kill_counts() -> None:
    """Print the kills per command (run with -s to see them; RESULTS.md quotes them)."""
    print("\nkills per writing command:", json.dumps(KILL_LOG))
    assert all(n >= 2 for n in KILL_LOG.values())
