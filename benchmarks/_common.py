"""Shared by the benchmark scripts: passive OpenMP waiting (set before torch is imported) and a timer.

With OpenMP's default busy-wait, a concurrent job can slow a 2-thread torch loop 10-100x; benchmarks
import this module first so every measurement runs with OMP_WAIT_POLICY=PASSIVE unless told otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of fn."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
