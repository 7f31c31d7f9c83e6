"""The training contract of the epoch-trained detectors (conv_ae, vae, anogan, egbad, ganomaly,
skip_ganomaly): `train_more` over a tensor of prepared images, named optimisers, a per-step callback.

`fit` and continual learning both train through `train_more`, so every way of training a detector
runs the same loop (`run_epochs`) with the same seeding.

Minimum training on small folders (`EpochTrained.fit_epochs`): the papers' epochs (vae 20 x batch 128,
ganomaly 15 x 64, ...) assume thousands of images; on 60 photos they are ~20 optimisation steps and the
detector scores at chance. So `fit` trains max(epochs, ceil(min_steps / steps per epoch)) epochs, with
`min_steps` = 500 steps (one step = one mini-batch, one update of each optimiser), unless `epochs` was
passed explicitly: then exactly `epochs` are trained, with a warning naming the fix when they give fewer
than `min_steps` steps. On data large enough (MNIST's ~3,600 normal digits: vae 580 steps, ganomaly and
skip_ganomaly and anogan 855, egbad 3,600) the papers' epochs stand unchanged.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from anomalab import distributed
from anomalab.errors import NotSupportedError
from anomalab.train.loop import Batches, run_epochs, seed_everything

log = logging.getLogger(__name__)

Step = Callable[[Tensor], dict[str, float]]
OnStep = Callable[[dict[str, float]], None]

MIN_STEPS = 500  # optimisation steps `fit` trains at least when `epochs` is left at its default


def _recording_init(init: Callable[..., None]) -> Callable[..., None]:
    """`init` that first records, on the outermost call, which parameters the caller passed
    (`_explicit_params`), so `fit_epochs` can tell `epochs=20` given from the default 20."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "_explicit_params" not in self.__dict__:
            try:
                given = signature.bind_partial(self, *args, **kwargs).arguments
            except TypeError:  # init itself reports the bad call
                given = {}
            self.__dict__["_explicit_params"] = frozenset(given) - {"self"}
        init(self, *args, **kwargs)

    __init__._records_params = True  # type: ignore[attr-defined]
    return __init__


@runtime_checkable
class SingleLoss(Protocol):
    """A detector whose training step minimises one loss with one optimiser (conv_ae, vae): a strategy
    can extend that loss (ewc's penalty, its Fisher) and compose the step itself."""

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, float]]: ...


def match_state_layout(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Give every per-parameter state tensor (Adam's moments) its parameter's memory layout. Needed after a
    net changes layout (channels_last while training) or after moments were loaded from a file: torch's
    fused CPU Adam reads a parameter and its moments element by element in memory order, so moments in
    another layout than their parameter are silently paired with the wrong elements (measured: 6e-3 off
    after one step of a 4 x 3 x 2 x 2 tensor; tests/test_training_contract.py)."""
    for opt in optimizers:
        for param, state in opt.state.items():
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)  # param's strides


class EpochTrained:
    """Mixin implementing `anomalab.detector.Trainable` for detectors trained by epochs of mini-batches.

    Subclasses implement `_make_optimizers()` (name -> optimizer) and `_train_step(batch) -> logs` (one
    mini-batch: zero_grad, backward and one step of each optimiser), and may override `_training_data`
    (the tensor the step iterates over) and `_after_training`. Class attributes: `continual_strategies`
    (the strategies of `anomalab.continual` this detector's training takes), `progress` (progress bar),
    `on_step` (the callback `train_more` uses when none is passed, so that `fit` reports steps too),
    `min_steps` (see `fit_epochs`).
    """

    continual_strategies: ClassVar[tuple[str, ...]] = ()
    min_steps: ClassVar[int] = MIN_STEPS
    # True where one training step is exact over several ranks (`anomalab.distributed`): every loss a mean over
    # the batch's images, every random draw made for the whole global batch; the others refuse under torchrun
    distributable: ClassVar[bool] = False
    progress: bool = True
    on_step: OnStep | None = None
    optimizers_: dict[str, torch.optim.Optimizer] | None = None  # built by the first train_more
    _explicit_params: frozenset[str] = frozenset()  # parameters passed to __init__ (set per instance)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_records_params", False):
            cls.__init__ = _recording_init(init)

    def fit_epochs(self, n: int) -> int:
        """Epochs `fit` trains on n images: `epochs` when passed explicitly (warning when that gives fewer
        than `min_steps` optimisation steps), else max(epochs, ceil(min_steps / steps per epoch)), noted in
        the log when it extends (module docstring)."""
        epochs, batch = int(self.epochs), int(self.batch_size)
        per_epoch = max(1, math.ceil(n / batch))
        steps = epochs * per_epoch
        if steps >= self.min_steps:
            return epochs
        needed = math.ceil(self.min_steps / per_epoch)
        if "epochs" in self._explicit_params:
            log.warning("%s: epochs=%d on %d images (batch_size %d) gives only %d optimisation steps (fewer than "
                        "%d; scores may stay near chance): pass epochs=%d, or leave epochs out to train that many",
                        self.name, epochs, n, batch, steps, self.min_steps, needed)
            return epochs
        log.info("%s: training %d epochs instead of %d to reach %d optimisation steps (%d images at batch_size %d: "
                 "%d per epoch); pass epochs= to choose", self.name, needed, epochs, self.min_steps, n, batch,
                 per_epoch)
        return needed

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

        epochs: passes over x (default: `fit_epochs(len(x))`, the detector's `epochs` raised to reach
        `min_steps` unless `epochs` was passed explicitly). step(batch) -> logs: replaces
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

        if epochs is None:
            epochs = self.fit_epochs(len(x))
        group = distributed.active()
        if group is not None:
            self._train_distributed(x, epochs, step or self._train_step, callback, step, desc, group, generator)
            return
        with self._training_data(x) as data:
            loader = Batches(data, self.batch_size, shuffle=True, generator=generator)
            self.history_ += run_epochs(run, loader, epochs, progress=self.progress, desc=desc or f"{self.name} fit")
            self._after_training(data)

    def _train_distributed(self, x: Tensor, epochs: int, run: Step, callback: OnStep | None, step: Step | None,
                           desc: str | None, group: distributed.Group, generator: torch.Generator) -> None:
        """`train_more` over the ranks of `anomalab.distributed` (inside `distributed.scope()`): the same
        shuffled global batches on every rank, each rank stepping on its share (see that module); the result
        equals one process's to float rounding. Refuses detectors and custom steps it cannot make exact."""
        def check() -> None:
            if not self.distributable:
                distributed.check_supported(self)
            if step is not None:
                raise NotSupportedError(f"{self.name}: a custom training step (continual learning) cannot be "
                                        "distributed; run it in one process")
            distributed.check_batches(len(x), int(self.batch_size), group, self.name)

        distributed.agree(check, group)
        with self._training_data(x) as data:
            loader = Batches(data, self.batch_size, shuffle=True, generator=generator)
            with distributed.synced_training(self._nets(), self.optimizers_, group) as synced:
                def global_step(batch: Tensor) -> dict[str, float]:
                    logs = synced(batch, run)  # the whole batch's values, on every rank
                    if callback is not None:
                        callback(logs)
                    return logs

                self.history_ += run_epochs(global_step, loader, epochs, progress=self.progress and group.rank == 0,
                                            desc=desc or f"{self.name} fit ({group.world} processes)")
            self._after_training(data)
