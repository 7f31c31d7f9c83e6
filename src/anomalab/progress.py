"""Progress of long steps (training epochs, feature extraction, scoring folders), one helper for all.

On a terminal (stderr is a TTY, or a Jupyter kernel) a tqdm bar, shown once the step has run for
`BAR_DELAY` seconds and cleared when it ends. Elsewhere (a log file, a pipe, CI) no carriage-return
output: log lines on the `anomalab.progress` logger at INFO level, one per epoch (`Progress.epoch`) and one
when a stage ends, each at most every `LINE_INTERVAL` seconds (the last epoch always) and a stage's line only
when it took `MIN_STAGE_SECONDS` or more. The command line shows these lines; a library user sees them once
logging is configured at INFO (e.g. `logging.basicConfig(level=logging.INFO)`).

    for batch in progress(batches, "gaussian features", total=len(batches), unit="batch"):
        ...
    with Progress("vae fit", total=epochs * steps, unit="step") as bar:
        ...; bar.update(); ...; bar.epoch(i, epochs, {"loss": 0.01})
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

log = logging.getLogger("anomalab.progress")

T = TypeVar("T")

BAR_DELAY = 0.5  # seconds before a bar appears (steps that end sooner show nothing)
LINE_INTERVAL = 10.0  # seconds between two log lines of one step on a non-terminal
MIN_STAGE_SECONDS = 2.0  # a stage that ended sooner writes no line


def on_terminal(stream: Any = None) -> bool:
    """Whether progress goes to a terminal that redraws a bar: `stream` (default stderr) is a TTY, or the
    code runs in a Jupyter kernel (tqdm.auto draws a widget there)."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return "ipykernel" in sys.modules


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "ch", "sh", "x")) else "s")


def _format(values: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())


class Progress:
    """A progress display for one step: a tqdm bar on a terminal, else throttled log lines (module
    docstring). `enabled=False` shows nothing. Use as a context manager, or call `close()`."""

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "it", enabled: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = enabled
        self.count = 0
        self.start = self._last_line = time.perf_counter()
        self._bar = None
        self._closed = False
        self._epochs = False  # epoch lines written: they already tell how the step ended
        if enabled and on_terminal():
            from tqdm.auto import tqdm

            options = dict(total=total, desc=desc, unit=unit, mininterval=1.0, leave=False)
            try:
                self._bar = tqdm(**options, delay=BAR_DELAY)
            except TypeError:  # tqdm before 4.62 has no delay
                self._bar = tqdm(**options)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def lines(self) -> bool:
        """Whether this display writes log lines (enabled, not on a terminal)."""
        return self.enabled and self._bar is None

    def update(self, n: int = 1) -> None:
        """n more units done."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def _line(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last_line >= LINE_INTERVAL:
            self._last_line = now
            log.info("%s: %s (%.1f s)", self.desc, text, now - self.start)

    def epoch(self, index: int, epochs: int, values: Mapping[str, float]) -> None:
        """Epoch `index` (0-based) of `epochs` ended with these mean logged values: the bar's postfix, or a
        log line (the last epoch's always)."""
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        elif self.enabled:
            self._epochs = True
            self._line(f"epoch {index + 1}/{epochs} {_format(values)}".rstrip(), force=index + 1 == epochs)

    def close(self) -> None:
        """End the step: the bar is cleared; on a non-terminal a stage without epoch lines that took
        `MIN_STAGE_SECONDS` or more writes one closing line (units done and time)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and not self._epochs and time.perf_counter() - self.start >= MIN_STAGE_SECONDS:
            of = f"/{self.total}" if self.total is not None else ""
            self._line(f"done, {self.count}{of} {_plural(self.unit)}", force=True)


def progress(iterable: Iterable[T], desc: str, total: int | None = None, *, unit: str = "it",
             enabled: bool = True) -> Iterator[T]:
    """Yield the items of `iterable`, showing progress as `Progress` does (one unit per item). total:
    the number of items (default: len(iterable) when it has one)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(desc, total, unit=unit, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update()
