"""The one rule every command that writes files follows: never overwrite without `--overwrite`, never write
into its own input, never delete what it did not create."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from anomalab.errors import RunFolderError


def _resolved(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def is_within(path: str | Path, folder: str | Path) -> bool:
    """True when `path` is `folder` or lies inside it (after resolving links and '..')."""
    path, folder = _resolved(path), _resolved(folder)
    return path == folder or folder in path.parents


def check_not_input(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse an output that is one of the inputs, lies inside one, or holds one."""
    for given in inputs:
        if given is None:
            continue
        if is_within(out, given):
            raise RunFolderError(f"{flag} {out} is inside the input {given}: a command never writes into its own "
                                 "input; choose another output")
        if is_within(given, out):
            raise RunFolderError(f"{flag} {out} holds the input {given}: writing there could replace it; choose "
                                 "another output")


def check_output_file(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                      flag: str = "--out") -> Path:
    """An output file that may be written: not an input, not a folder, absent unless `overwrite`."""
    out = Path(out)
    check_not_input(out, inputs, flag)
    if out.is_dir():
        raise RunFolderError(f"{flag} {out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise RunFolderError(f"{out} exists; pass --overwrite to replace it")
    return out


def check_output_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                     replaceable: Callable[[Path], bool] | None = None, what: str = "output folder",
                     flag: str = "--out") -> Path:
    """An output folder that may be (re)written as a whole.

    Absent or empty: fine. Holding files: refused without `overwrite`; with it, replaced only when
    `replaceable(out)` says it is a folder this toolkit wrote (a run folder, a dataset it built), never a
    folder of other files, whatever the flag."""
    out = Path(out)
    check_not_input(out, inputs, flag)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{flag} {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        ours = replaceable is not None and replaceable(out)
        if not ours:
            raise RunFolderError(f"{out} holds files that are not an anomalab {what}; nothing there is deleted: "
                                 f"choose another {flag}")
        if not overwrite:
            raise RunFolderError(f"{out} already holds an anomalab {what}; choose another {flag} or pass "
                                 "--overwrite to replace it")
    return out
