"""Crash-safe writes: every file and folder dinokit writes is the complete old or the complete new
state at every instant, whatever moment the process is killed.

Files (:func:`atomic_path`, :func:`write_json`): written under a temporary name beside the target,
fsynced, renamed over the target, and the folder fsynced. Created with mode ``0o666 & ~umask``
(0644 under the usual umask), not the 0600 of ``tempfile.mkstemp``. Temporary files left by a killed
process are removed by the next write of the same output.

Folders (:func:`atomic_folder`): the new folder is staged beside the old one, every file and folder
in it fsynced, marked ready by a rename, then switched in with one ``renameat2(RENAME_EXCHANGE)``
(Linux) so the path always names a whole folder. Where the exchange is not available the switch is
two renames with the ready folder as its journal: :func:`recover_folder` (called by the next write
and by ``dinokit.load``) finishes a switch a killed process left half done, and removes staging
folders of dead processes (an unfinished write is discarded: the old folder stays).

``DINOKIT_CRASH_AT=POINT[#N]`` (read at call time, for the kill tests) SIGKILLs the process at the
N-th (default first) pass through a named point: ``file:synced``, ``file:renamed``,
``folder:ready``, ``folder:aside``, ``folder:switched``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

CRASH_ENV = "DINOKIT_CRASH_AT"
_crash_counts: dict[str, int] = {}

# .NAME.PID.HEX.tmpSUFFIX (this module) or .NAME.XXXXXXXX.tmpSUFFIX (older dinokit, mkstemp)
_TMP_FILE = re.compile(r"^(?:(?P<pid>\d+)\.[0-9a-f]+|[A-Za-z0-9_]{8})\.tmp(?P<suffix>.*)$")
# .NAME.PID.HEX.(staging|ready|old) (this module) or .NAME.tmp-PID (older dinokit.save)
_TMP_DIR = re.compile(r"^(?:(?P<pid>\d+)\.(?P<seq>[0-9a-f]+)\.(?P<kind>staging|ready|old)|tmp-(?P<oldpid>\d+))$")


# ------------------------------------------------------------------------------ test hook


def crash_point(name: str) -> None:
    """SIGKILL this process here when ``DINOKIT_CRASH_AT`` names this point (``NAME`` or ``NAME#N``)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("#")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ small helpers


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's or a folder's data and metadata to disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # folders on platforms that cannot open them
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on folders; the rename is still atomic
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (folders after their contents)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_path(p)
        fsync_path(dirpath)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        log.info("removed %s, left by a killed run", path)
    except FileNotFoundError:
        pass
    except OSError as e:  # read-only place: leave it, it costs only space
        log.debug("cannot remove stale %s (%s)", path, e)


# ------------------------------------------------------------------------------ files


def clean_stale_temps(path: str | os.PathLike[str]) -> int:
    """Remove temporary files of ``path`` left by processes that are no longer running; returns the count."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        m = _TMP_FILE.match(entry.name[len(prefix):])
        if m is None or m.group("suffix") != path.suffix or entry.is_dir(follow_symlinks=False):
            continue
        if m.group("pid") is None or not _pid_alive(int(m.group("pid"))):
            _remove(Path(entry.path))
            removed += 1
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The temp file lives in the same folder so ``os.replace`` is an atomic rename, and it keeps the
    suffix of ``path`` so writers that infer the format from the name (PIL, matplotlib) still work.
    The file is fsynced before the rename and the folder after it; it is created empty with mode
    ``0o666 & ~umask``. Temp files of this output left by killed processes are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    try:
        yield tmp
        fsync_path(tmp)  # the data must be on disk before the name points at it
        crash_point("file:synced")
        os.replace(tmp, path)
        crash_point("file:renamed")
        fsync_path(path.parent)  # make the rename itself durable
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], data: object) -> None:
    """Write ``data`` as indented JSON, atomically (non-JSON values such as paths become strings)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------ folders


def _renameat2_exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError) as e:
        raise OSError(errno.ENOSYS, "renameat2 is not available") from e
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


_exchange = _renameat2_exchange  # a module attribute so tests can take the two-rename path


def _siblings(folder: Path) -> list[tuple[Path, re.Match[str]]]:
    prefix = f".{folder.name}."
    try:
        names = [e.name for e in os.scandir(folder.parent) if e.name.startswith(prefix)]
    except OSError:
        return []
    found = []
    for name in names:
        m = _TMP_DIR.match(name[len(prefix):])
        if m is not None:
            found.append((folder.parent / name, m))
    return found


def recover_folder(folder: str | os.PathLike[str]) -> None:
    """Finish or discard what a killed :func:`atomic_folder` left beside ``folder``.

    ``folder`` missing with a ready replacement beside it: the switch had begun, finish it (the new
    state). ``folder`` missing with only the moved-aside old one: put it back (the old state).
    Otherwise remove staging, ready and old folders of processes that are no longer running.
    Entries of live processes are left alone, so this is safe beside a concurrent writer.
    """
    folder = Path(folder)
    dead = []
    for path, m in _siblings(folder):
        pid = int(m.group("pid") or m.group("oldpid"))
        if not _pid_alive(pid):
            dead.append((path, m.group("kind") or "staging", int(m.group("seq") or "0", 16)))
    if not dead:
        return
    if not os.path.lexists(folder):
        for kind in ("ready", "old"):  # newest first: the ready folder is the state being switched in
            cands = sorted((p for p, k, _ in dead if k == kind), key=lambda p: p.stat().st_mtime_ns)
            if cands:
                try:
                    os.rename(cands[-1], folder)
                    fsync_path(folder.parent)
                    log.warning("%s: finished a folder switch interrupted by a killed run (%s state)",
                                folder, "new" if kind == "ready" else "old")
                except OSError as e:
                    log.warning("%s: cannot finish an interrupted folder switch (%s)", folder, e)
                break
    for path, _, _ in dead:
        if path.exists():
            _remove(path)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) the entries of ``old`` that ``new`` does not have into ``new``."""
    for entry in os.scandir(old):
        dst = new / entry.name
        if os.path.lexists(dst):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        else:
            _link_or_copy(entry.path, str(dst))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def switch_folder(ready: Path, folder: Path) -> None:
    """Put the complete folder ``ready`` at ``folder`` (sibling paths); the old one is removed after.

    One atomic exchange where the OS offers it; else two renames that :func:`recover_folder`
    finishes if the process dies between them.
    """
    if not os.path.lexists(folder):
        os.rename(ready, folder)
        fsync_path(folder.parent)
        return
    try:
        _exchange(ready, folder)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise
        aside = ready.with_name(ready.name[: -len(".ready")] + ".old")
        os.rename(folder, aside)
        fsync_path(folder.parent)
        crash_point("folder:aside")
        try:
            os.rename(ready, folder)
        except OSError:
            os.rename(aside, folder)  # roll back: the old folder stays
            raise
        fsync_path(folder.parent)
        crash_point("folder:switched")
        shutil.rmtree(aside, ignore_errors=True)
        return
    fsync_path(folder.parent)
    crash_point("folder:switched")
    shutil.rmtree(ready, ignore_errors=True)  # after the exchange it holds the old folder


@contextmanager
def atomic_folder(folder: str | os.PathLike[str], *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``folder``; when the block ends without error it replaces
    ``folder`` whole (old or new at every instant); on error the staging folder is removed.

    ``keep_existing``: entries of the old folder that the block did not write are carried into the
    new one (hard links where possible). A ``folder`` that is a symlink is resolved, so the write
    lands where the link points. Raises NotADirectoryError when ``folder`` is a file.
    """
    folder = Path(folder)
    if folder.is_symlink() and folder.is_dir():
        folder = Path(os.path.realpath(folder))
    if os.path.lexists(folder) and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    stem = f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}"
    staging = folder.parent / f"{stem}.staging"
    ready = folder.parent / f"{stem}.ready"
    staging.mkdir(mode=0o777)  # the umask applies, as for any folder the user makes
    try:
        yield staging
        if keep_existing and folder.is_dir():
            _carry_over(folder, staging)
        fsync_tree(staging)
        os.rename(staging, ready)  # from here on the new state is complete on disk
        fsync_path(folder.parent)
        crash_point("folder:ready")
        switch_folder(ready, folder)
    finally:
        for p in (staging, ready):
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)
