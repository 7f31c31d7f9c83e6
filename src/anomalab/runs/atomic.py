"""Writing folders and files so that a reader never sees half of them.

A folder is built in a hidden sibling (`.<name>.tmp-<pid>-<random>`, same file system) and renamed into
place when complete; a file is written to a hidden sibling and `os.replace`d. An interrupted write leaves
the old content (or nothing) at the target, and a hidden temporary that the next write of the same target
removes once its process is gone. The per-target lock (`fcntl.flock` on `.<name>.lock` beside it) makes a
second concurrent writer fail at once instead of mixing two results in one folder.

Hand-written: the standard library has atomic file replacement (`os.replace`) but no staged folder with a
lock, and the packages that offer atomic files (e.g. atomicwrites, unmaintained) do not cover folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from anomalab.errors import RunFolderError

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_siblings(target: Path) -> list[Path]:
    """Hidden temporaries of `target` left by writers that are gone (killed mid-write)."""
    out = []
    if not target.parent.is_dir():
        return out
    for tag in (TMP_TAG, OLD_TAG):
        for p in target.parent.glob(f".{target.name}{tag}*"):
            pid = p.name[len(f".{target.name}{tag}"):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                out.append(p)
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temp_sibling(target: Path, tag: str = TMP_TAG) -> Path:
    return target.parent / f".{target.name}{tag}{os.getpid()}-{secrets.token_hex(4)}"


class TargetLock:
    """An exclusive, non-blocking lock of one output path, held from the checks to the final rename."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> TargetLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunFolderError(f"{self.target} is being written by another process (pid {holder}); wait for "
                                 "it to finish or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TargetLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def replace_dir(staged: Path, target: Path) -> None:
    """Put the complete folder `staged` at `target`. An existing `target` (which the caller has checked may
    be replaced) is first renamed aside and removed only after the new folder is in place."""
    aside = None
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        aside = temp_sibling(target, OLD_TAG)
        os.rename(target, aside)
    elif target.is_dir():
        target.rmdir()  # an empty folder: rename(2) would replace it too; this keeps the intent explicit
    try:
        os.rename(staged, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    if aside is not None:
        _remove(aside)


@contextlib.contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """`with staged_dir(target) as tmp:` write the folder's files into `tmp`; on a normal exit `tmp`
    replaces `target` (see replace_dir), on an exception `tmp` is removed and `target` is untouched.
    The caller checks beforehand that `target` may be replaced."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_siblings(target):
        _remove(stale)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    try:
        replace_dir(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """A hidden sibling of `target` to write (by path: a writer such as `torch.save` streams to it), moved onto
    `target` with os.replace when the block ends; removed, `target` untouched, when the block raises."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file_atomic(target: str | Path, data: str | bytes) -> Path:
    """Write `data` to `target` through a hidden sibling and os.replace (readers see old or new, never half)."""
    with atomic_file(target) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
    return Path(target)
