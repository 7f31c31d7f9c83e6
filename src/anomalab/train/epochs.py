"""The training contract of the epoch-trained detectors (conv_ae, vae, anogan, egbad, ganomaly,
skip_ganomaly): `train_more` over a tensor of prepared images, named optimisers, a per-step callback.

`fit` and continual learning both train through `train_more`, so every way of training a detector
runs the same loop (`run_epochs`) with the same seeding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from anomalab.train.loop import Batches, run_epochs, seed_everything

Step = Callable[[Tensor], dict[str, float]]
OnStep = Callable[[dict[str, float]], None]


@runtime_checkable
class SingleLoss(Protocol):
    """A detector whose training step minimises one loss with one optimiser (conv_ae, vae): a strategy
    can extend that loss (ewc's penalty, its Fisher) and compose the step itself."""

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, float]]: ...


class EpochTrained:
    """Mixin implementing `anomalab.detector.Trainable` for detectors trained by epochs of mini-batches.

    Subclasses implement `_make_optimizers()` (name -> optimizer) and `_train_step(batch) -> logs` (one
    mini-batch: zero_grad, backward and one step of each optimiser), and may override `_training_data`
    (the tensor the step iterates over) and `_after_training`. Class attributes: `continual_strategies`
    (the strategies of `anomalab.continual` this detector's training takes), `progress` (progress bar),
    `on_step` (the callback `train_more` uses when none is passed, so that `fit` reports steps too).
    """

    continual_strategies: ClassVar[tuple[str, ...]] = ()
    progress: bool = True
    on_step: OnStep | None = None
    optimizers_: dict[str, torch.optim.Optimizer] | None = None  # built by the first train_more

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def _train_step(self, batch: Tensor) -> dict[str, float]:
        raise NotImplementedError

    def reset_optimizers(self) -> None:
        """Drop the optimisers (and their moments): the next `train_more` starts fresh ones."""
        self.optimizers_ = None

    @contextmanager
    def _training_data(self, x: Tensor) -> Iterator[Tensor]:
        """Networks in training mode; yields the tensor the step's batches are cut from (default x)."""
        for net in self._nets().values():
            net.train()
        yield x

    def _after_training(self, data: Tensor) -> None:
        """Hook run after the epochs of one `train_more` call, on the tensor they iterated over."""

    def train_more(self, x: Tensor, epochs: int | None = None, *, step: Step | None = None,
                   desc: str | None = None, on_step: OnStep | None = None) -> None:
        """Train the current networks further on prepared images x (N, C, H, W) in [0, 1].

        epochs: passes over x (default: the detector's `epochs`). step(batch) -> logs: replaces
        `_train_step` for this call (a continual strategy's step); it gets the batches `_train_step`
        would get. desc: progress-bar label. on_step(logs): called after every training step (one
        mini-batch: one update of each optimiser) with that step's logged values; default: the
        `on_step` attribute. Optimisers persist across calls until `reset_optimizers()`; shuffling is
        seeded with `seed + epochs trained so far`, so a cut run continues like an uncut one.
        """
        generator = seed_everything(self.seed + len(self.history_))
        if self.optimizers_ is None:
            self.optimizers_ = self._make_optimizers()
        run = step or self._train_step
        callback = self.on_step if on_step is None else on_step
        if callback is not None:
            inner = run

            def run(batch: Tensor) -> dict[str, float]:
                logs = inner(batch)
                callback(logs)
                return logs

        with self._training_data(x) as data:
            loader = Batches(data, self.batch_size, shuffle=True, generator=generator)
            self.history_ += run_epochs(run, loader, self.epochs if epochs is None else epochs,
                                        progress=self.progress, desc=desc or f"{self.name} fit")
            self._after_training(data)
