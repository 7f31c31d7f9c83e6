"""RunFolder: the one writer and reader of a run folder.

    <run>/run.json         marker written last: status "complete", kind, versions, files, created
    <run>/config.json      everything needed to redo or continue the run (detector, params, data spec,
                           calibration share and seed, max FPR, continual history, command)
    <run>/history.json     per-epoch training losses
    <run>/detector/        the saved detector (weights.safetensors + detector.json, with its threshold)
    <run>/evaluation.json  scores, labels and metrics on the test set (when the data has one)
    <run>/*.png, report.html   figures and the page built from the records above

A run is written by `RunWriter`: the whole folder is built in a hidden sibling and renamed into place
only when complete, under a lock, so a target is either the old run, the new complete run, or absent;
an interrupted or failed run leaves nothing behind, and a folder that is not a run is never replaced.
Folders written before run.json existed (config.json + detector/) are still read as runs.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from anomalab._version import __version__
from anomalab.errors import RunFolderError
from anomalab.runs.atomic import TargetLock, staged_dir
from anomalab.runs.outputs import check_output_dir

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
RUN_FORMAT = 1


def versions() -> dict[str, str]:
    import numpy as np
    import torch

    return {"anomalab": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def is_run(path: str | Path) -> bool:
    """True for a complete run folder (run.json with status complete, or a pre-run.json run folder)."""
    path = Path(path)
    marker = path / RUN_FILE
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("status") == "complete"
        except (json.JSONDecodeError, AttributeError):
            return False
    return (path / CONFIG_FILE).is_file() and (path / "detector" / "detector.json").is_file()


class RunFolder:
    """Read access to a complete run folder: `RunFolder(path).config`, `.evaluation`, `.detector()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunFolderError(f"run folder not found: {self.path}")
        if not is_run(self.path):
            raise RunFolderError(f"{self.path} is not a complete anomalab run folder (no {RUN_FILE} marking it "
                                 "complete): it was not written by `anomalab fit`, or that run did not finish")

    def _json(self, name: str) -> dict[str, Any] | None:
        f = self.path / name
        return json.loads(f.read_text()) if f.is_file() else None

    @property
    def config(self) -> dict[str, Any]:
        return self._json(CONFIG_FILE) or {}

    @property
    def marker(self) -> dict[str, Any]:
        return self._json(RUN_FILE) or {}

    @property
    def evaluation(self) -> dict[str, Any] | None:
        return self._json("evaluation.json")

    def detector(self):
        from anomalab.registry import load

        return load(self.path / "detector")


class RunWriter:
    """`with RunWriter(out, overwrite=..., inputs=[...]) as run:` write files under `run.path`; on a normal
    exit run.json is added and the folder renamed into place atomically.

    Construction checks the target (see `check_output_dir`: an existing run is replaced only with
    `overwrite`, any other non-empty folder never; never an input or a folder holding one) and takes its
    lock, so a mistake or a concurrent writer fails before any work starts."""

    def __init__(self, out: str | Path, *, overwrite: bool = False, inputs=(), kind: str = "fit"):
        self.target = Path(out)
        self.kind = kind
        check_output_dir(self.target, overwrite=overwrite, inputs=inputs, replaceable=is_run, what="run folder")
        self._lock = TargetLock(self.target).acquire()
        self._stage = None
        self.path: Path | None = None
        self.started = time.time()

    def __enter__(self) -> RunWriter:
        self._stage = staged_dir(self.target)
        self.path = self._stage.__enter__()
        return self

    def write_json(self, name: str, obj: Any) -> Path:
        f = self.path / name
        f.write_text(json.dumps(obj, indent=1, default=str))
        return f

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                files = sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())
                self.write_json(RUN_FILE, {"status": "complete", "format": RUN_FORMAT, "kind": self.kind,
                                           "versions": versions(), "files": files, "started": self.started,
                                           "finished": time.time()})
            self._stage.__exit__(exc_type, exc, tb)
        finally:
            self._lock.release()
        self.path = self.target

    def close(self) -> None:
        """Release the lock of a writer that was never entered (e.g. a failure between checks and writing)."""
        self._lock.release()
