"""The training loop every gradient-trained detector shares: epochs, progress, loss history."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from anomalab.progress import Progress


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch's global RNGs (network init, sampling); return a CPU generator
    seeded the same way for data shuffling, so shuffling does not depend on how many random numbers
    the networks drew."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Batches:
    """Re-iterable mini-batches over an in-memory (N, ...) tensor, reshuffled at every pass.

    Slicing one tensor avoids a DataLoader's per-item collation, which costs more than a step of a
    small net. Datasets too large for memory pass any other iterable of batches to `run_epochs`.
    """

    def __init__(self, data: Tensor, batch_size: int, shuffle: bool = True,
                 generator: torch.Generator | None = None, drop_last: bool = False):
        if len(data) == 0:
            raise ValueError("cannot train on an empty set of images")
        self.data, self.batch_size, self.shuffle = data, int(batch_size), shuffle
        self.generator, self.drop_last = generator, drop_last

    def __len__(self) -> int:
        n, b = len(self.data), self.batch_size
        return n // b if self.drop_last and n >= b else -(-n // b)

    def __iter__(self) -> Iterator[Tensor]:
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            yield self.data[order[i * self.batch_size : (i + 1) * self.batch_size]]


def run_epochs(
    step: Callable[[Tensor], dict[str, float]],
    loader: Iterable[Tensor],
    epochs: int,
    progress: bool = True,
    desc: str = "train",
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Call `step(batch)` over `loader` for `epochs` passes; return the per-epoch mean of each logged
    value (one dict per epoch). `step` owns zero_grad/backward/step; this loop owns nothing else.
    progress: a bar on a terminal, one log line per epoch elsewhere (`anomalab.progress`)."""
    history: list[dict[str, float]] = []
    try:
        total = epochs * len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    with Progress(desc, total, unit="step", enabled=progress) as bar:
        for epoch in range(epochs):
            sums: dict[str, float] = {}
            n = 0
            for batch in loader:
                logs = step(batch)
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
                bar.update(1)
            means = {k: v / max(n, 1) for k, v in sums.items()}
            history.append(means)
            bar.epoch(epoch, epochs, means)
            if on_epoch_end is not None:
                on_epoch_end(epoch, means)
    return history
