"""One worker thread that scores the images of concurrent requests together.

Requests `submit` their prepared images; the worker takes up to `batch_size` waiting images at a time,
after waiting at most `window_s` for more to arrive once the first is there, and scores them as one batch
of exactly `batch_size` rows (the rest padded with blank images, as `anomalab.scoring` does, so an image's
score does not depend on which others share its batch). Each request's future completes when its last
image is scored. A failing batch fails the requests in it and nothing else: the worker carries on.

A padded batch costs the same however few real images it holds, so the worker keeps collecting while
images keep arriving: it starts the batch once it is full, or once `window_s` passes without a new image,
or at the latest `fill_wait` of the last batch's duration after the first image (at least `window_s`, at
most `max_wait_s`). Clients just answered then have time to send their next images into the next batch,
while a lone request waits `window_s` only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anomalab.errors import UserError


class Busy(UserError, RuntimeError):
    """More images are waiting than the server keeps queued: the client should retry later."""


@dataclass
class _Job:
    items: Sequence[Any]
    maps: bool
    future: Future
    scores: list = field(default_factory=list)
    maps_out: list = field(default_factory=list)
    left: int = 0

    def __post_init__(self):
        self.scores = [None] * len(self.items)
        self.maps_out = [None] * len(self.items)
        self.left = len(self.items)


class Batcher:
    """fn(batch (batch_size, C, H, W), maps: bool) -> (scores (batch_size,), maps (batch_size, h, w) or None);
    `pad(batch, n)` appends n blank rows. `stats` counts batches, images and seconds spent scoring."""

    def __init__(self, fn: Callable, stack: Callable, pad: Callable, batch_size: int, window_s: float = 0.005,
                 max_pending: int = 4096, fill_wait: float = 0.25, max_wait_s: float = 0.1):
        self.fn, self.stack, self.pad = fn, stack, pad
        self.batch_size, self.window_s, self.max_pending = int(batch_size), float(window_s), int(max_pending)
        self.fill_wait, self.max_wait_s = float(fill_wait), float(max_wait_s)
        self._last_s = 0.0  # how long the last batch took
        self._pending: deque[tuple[_Job, int]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"batches": 0, "images": 0, "failed_batches": 0, "scoring_s": 0.0}

    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="anomalab-scorer", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, items: Sequence[Any], maps: bool = False) -> Future:
        """Queue prepared images; the future's result is (scores list, maps list) in their order."""
        future: Future = Future()
        if not items:
            future.set_result(([], []))
            return future
        self.start()
        job = _Job(items, maps, future)
        with self._cond:
            if len(self._pending) + len(items) > self.max_pending:
                raise Busy(f"the server is busy ({len(self._pending)} images waiting): retry shortly")
            self._pending.extend((job, i) for i in range(len(items)))
            self._cond.notify_all()
        return future

    def _take(self) -> list[tuple[_Job, int]] | None:
        with self._cond:
            while not self._pending and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            limit = time.monotonic() + max(self.window_s, min(self.max_wait_s, self.fill_wait * self._last_s))
            quiet_until = time.monotonic() + self.window_s
            while len(self._pending) < self.batch_size and not self._stop:
                now = time.monotonic()
                if now >= min(limit, quiet_until):
                    break
                n = len(self._pending)
                self._cond.wait(min(limit, quiet_until) - now)
                if len(self._pending) > n:  # a new image: wait window_s more for the next one
                    quiet_until = time.monotonic() + self.window_s
            n = min(self.batch_size, len(self._pending))
            return [self._pending.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                break
            jobs = {id(job): job for job, _ in taken}
            started = time.monotonic()
            try:
                items = [job.items[i] for job, i in taken]
                batch = self.stack(items)
                if len(items) < self.batch_size:
                    batch = self.pad(batch, self.batch_size - len(items))
                scores, maps = self.fn(batch, any(job.maps for job in jobs.values()))
                scores = np.asarray(scores)
                self.stats["batches"] += 1
                self.stats["images"] += len(items)
                self._last_s = time.monotonic() - started
                self.stats["scoring_s"] += self._last_s
            except Exception as e:  # a failing batch fails its requests, never the worker
                self.stats["failed_batches"] += 1
                for job in jobs.values():
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for k, (job, i) in enumerate(taken):
                if job.future.done():  # failed in an earlier batch
                    continue
                job.scores[i] = float(scores[k])
                job.maps_out[i] = None if maps is None or not job.maps else maps[k]
                job.left -= 1
                if job.left == 0:
                    job.future.set_result((job.scores, job.maps_out))
