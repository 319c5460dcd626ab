"""Crash-safe writes: umask modes, fsync before rename, stale temp cleanup, the atomic folder switch
and the recovery of a switch a killed process left half done."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinokit import _io
from dinokit._io import atomic_folder, atomic_path, clean_stale_temps, recover_folder, write_json


def _dead_pid() -> int:
    """The pid of a process that has exited (so no live process owns files named with it)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_files_and_folders_respect_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_folder(tmp_path / "model") as d:
            (d / "w.bin").write_bytes(b"1")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask  # 0644 under 022, not 0600
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "model" / "w.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_fsyncs_file_then_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        order.append("fsync:" + ("dir" if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) else "file"))
        real_fsync(fd)

    def replace(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        order.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json(tmp_path / "a.json", [1, 2])
    assert order == ["fsync:file", "rename", "fsync:dir"]
    assert (tmp_path / "a.json").read_text() == "[\n  1,\n  2\n]\n"


def test_stale_temps_of_killed_runs_are_removed_on_the_next_write(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getppid()
    stale = [f".out.npz.{dead}.1a2b3c4d.tmp.npz", ".out.npz.k3_x9a7q.tmp.npz"]  # ours, older dinokit's
    keep = [f".out.npz.{live}.99aa.tmp.npz", f".other.npz.{dead}.1a2b.tmp.npz", ".out.npz.notes.txt"]
    for name in stale + keep:
        (tmp_path / name).write_bytes(b"x")
    with atomic_path(tmp_path / "out.npz") as tmp:
        tmp.write_bytes(b"new")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*keep, "out.npz"])  # a live writer's temp file is left alone
    assert clean_stale_temps(tmp_path / "out.npz") == 0


def test_atomic_path_error_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_folder_replaces_whole_folder_and_keeps_other_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        def no_exchange(a: Path, b: Path) -> None:
            raise OSError(errno.EINVAL, "not supported here")
        monkeypatch.setattr(_io, "_exchange", no_exchange)
    folder = tmp_path / "m"
    with atomic_folder(folder) as d:
        (d / "config.json").write_text("old-config")
        (d / "weights").write_text("old-weights")
    (folder / "notes.md").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / "x").write_text("x")
    with atomic_folder(folder, keep_existing=True) as d:
        (d / "config.json").write_text("new-config")
        (d / "weights").write_text("new-weights")
    assert _tree(folder) == {"config.json": "new-config", "weights": "new-weights", "notes.md": "mine",
                             "sub/x": "x"}
    assert _siblings(folder) == []
    with atomic_folder(folder) as d:  # without keep_existing the folder is exactly the new one
        (d / "config.json").write_text("c3")
    assert _tree(folder) == {"config.json": "c3"}
    with pytest.raises(ValueError), atomic_folder(folder) as d:
        (d / "config.json").write_text("never")
        raise ValueError("bad")
    assert _tree(folder) == {"config.json": "c3"} and _siblings(folder) == []


def test_atomic_folder_through_a_symlink_and_onto_a_file(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with atomic_folder(tmp_path / "link") as d:
        (d / "a").write_text("1")
    assert (tmp_path / "link").is_symlink() and (real / "a").read_text() == "1"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file: exists and is not a folder"), \
            atomic_folder(tmp_path / "file"):
        pass


def _make(path: Path, content: str) -> None:
    path.mkdir()
    (path / "config.json").write_text(content)


def test_recover_finishes_a_switch_killed_between_its_renames(tmp_path: Path) -> None:
    folder, pid = tmp_path / "m", _dead_pid()
    _make(tmp_path / f".m.{pid}.ab12.ready", "new")  # complete new state, old moved aside, killed
    _make(tmp_path / f".m.{pid}.ab12.old", "old")
    recover_folder(folder)
    assert _tree(folder) == {"config.json": "new"} and _siblings(folder) == []


def test_recover_rolls_back_when_only_the_old_folder_is_aside(tmp_path: Path) -> None:
    folder, pid = tmp_path / "m", _dead_pid()
    _make(tmp_path / f".m.{pid}.ab12.old", "old")
    _make(tmp_path / f".m.{pid}.cd34.staging", "half")
    recover_folder(folder)
    assert _tree(folder) == {"config.json": "old"} and _siblings(folder) == []


def test_recover_discards_unfinished_writes_and_spares_live_ones(tmp_path: Path) -> None:
    folder, dead, live = tmp_path / "m", _dead_pid(), os.getppid()
    _make(folder, "current")
    _make(tmp_path / f".m.{dead}.ab12.ready", "never switched in")
    _make(tmp_path / f".m.{dead}.ab13.staging", "half")
    _make(tmp_path / f".m.tmp-{dead}", "older dinokit.save staging")
    _make(tmp_path / f".m.{live}.ab14.staging", "a live writer")
    recover_folder(folder)
    assert _tree(folder) == {"config.json": "current"}
    assert _siblings(folder) == [f".m.{live}.ab14.staging"]


def test_crash_point_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_io.CRASH_ENV, "some:other-point")
    _io.crash_point("file:synced")  # not named: nothing happens
    code = subprocess.run([sys.executable, "-c", "from dinokit._io import crash_point; import os; "
                           "os.environ['DINOKIT_CRASH_AT'] = 'p#2'; crash_point('p'); print('one'); "
                           "crash_point('p'); print('two')"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert code.returncode == -9 and code.stdout.split() == ["one"]
