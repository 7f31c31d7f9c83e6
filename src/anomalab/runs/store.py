"""ResultStore: the resumable results.jsonl every experiment appends to.

One JSON object per line, appended (and flushed to disk) as soon as a cell finishes, so a cut run loses
at most the cell it was in and a rerun skips what is done. Rows are keyed by some of their fields (e.g.
detector, digit, seed, budget); when several rows share a key (two runs merged into one file) the last
one wins. A last line cut mid-write by a kill is ignored with a warning instead of failing the rerun.
Each append holds an exclusive `fcntl.flock` on the file, so several processes (one per core, each on other
cells) can append to one store without interleaving their lines (`experiments._common.reopen` reads what
the others added).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ResultStore:
    """`store = ResultStore(out / "results.jsonl", key=("detector", "digit", "seed"))`;
    `if row_key not in store: store.add(run_cell(...))`; `store.rows()` for the table."""

    def __init__(self, path: str | Path, key: Sequence[str]):
        self.path = Path(path)
        self.key = tuple(key)
        self._rows: dict[tuple, dict[str, Any]] = {}
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:
                        log.warning("%s: ignoring a last line cut mid-write (line %d)", self.path, i + 1)
                        continue
                    raise ValueError(f"{self.path}, line {i + 1}: not a JSON object") from None
                self._rows[self.key_of(row)] = row

    def key_of(self, row: dict[str, Any]) -> tuple:
        return tuple(_hashable(row.get(k)) for k in self.key)

    def __contains__(self, key: tuple | dict[str, Any]) -> bool:
        return (self.key_of(key) if isinstance(key, dict) else tuple(key)) in self._rows

    def get(self, key: tuple | dict[str, Any]) -> dict[str, Any] | None:
        return self._rows.get(self.key_of(key) if isinstance(key, dict) else tuple(key))

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append `row` (it must hold every key field) and keep it; returns it."""
        missing = [k for k in self.key if k not in row]
        if missing:
            raise ValueError(f"result row lacks the key field(s) {missing}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, default=_jsonable) + "\n"
        with self.path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one writer at a time: a long line is several write() calls
            try:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        self._rows[self.key_of(row)] = row
        return row

    def rows(self) -> list[dict[str, Any]]:
        """Every stored row (one per key), in the order first written."""
        return list(self._rows.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows())

    def __len__(self) -> int:
        return len(self._rows)


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def _jsonable(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
