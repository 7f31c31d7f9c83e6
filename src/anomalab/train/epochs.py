"""The training contract of the epoch-trained detectors (conv_ae, vae, anogan, egbad, ganomaly,
skip_ganomaly): `train_more` over a tensor of prepared images, named optimisers, a per-step callback.

`fit` and continual learning both train through `train_more`, so every way of training a detector
runs the same loop (`run_epochs`) with the same seeding.

Checkpoints (`Checkpoint`, set as the detector's `checkpoint` attribute): `train_more` then saves its whole
training state (networks, optimisers' moments, fitted counters, every random generator, the epochs done)
at epoch ends, at most every `every_s` seconds and once at the end, and a later `train_more` on the same
detector settings and images resumes from that file: a run cut at any point and resumed ends with the same
weights, bit for bit, as one never cut (tests/test_checkpoint.py). Long reproductions (paper-length GAN
cells of 50 minutes) use it so that a cut costs minutes, not the cell.

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
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from anomalab import distributed
from anomalab.errors import LoadError, NotSupportedError
from anomalab.runs.atomic import atomic_file
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


class Checkpoint:
    """Where `train_more` keeps its resumable training state (one file, replaced atomically) and how often
    it writes it: at an epoch's end once `every_s` seconds have passed since the last write, and at the end
    of training. After a resume, `resumed_epochs` and `elapsed_before_s` say how many epochs and how many
    seconds of training the file already held. The file is never deleted here; its owner removes it once
    what it trained is safely stored."""

    def __init__(self, path: str | Path, every_s: float = 300.0):
        self.path = Path(path)
        self.every_s = float(every_s)
        self.resumed_epochs = 0
        self.elapsed_before_s = 0.0

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, every_s={self.every_s:g})"

    def read(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file: say which, never guess
            raise LoadError(f"{self.path} is not a readable training checkpoint ({e}); remove it to start "
                            "training afresh") from None

    def write(self, state: dict[str, Any]) -> None:
        with atomic_file(self.path) as tmp:  # a reader sees the previous checkpoint or this one, never half
            torch.save(state, tmp)  # streamed to the file: a 200 MB state is not held twice in memory


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random generator training draws from (torch's global one: init, latents, dropout; the
    shuffle generator; Python's and NumPy's, seeded by `seed_everything`), as plain tensors and tuples."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "shuffle": generator.get_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


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
    checkpoint: Checkpoint | None = None  # resumable training state (see the module docstring)
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
            if self.checkpoint is not None:
                raise NotSupportedError(f"{self.name}: training checkpoints are written by one process; "
                                        "run without torchrun or without a checkpoint")
            self._train_distributed(x, epochs, step or self._train_step, callback, step, desc, group, generator)
            return
        with self._training_data(x) as data:
            loader = Batches(data, self.batch_size, shuffle=True, generator=generator)
            desc = desc or f"{self.name} fit"
            if self.checkpoint is None:
                self.history_ += run_epochs(run, loader, epochs, progress=self.progress, desc=desc)
            else:
                self.history_ += self._run_checkpointed(run, loader, data, epochs, desc, generator, self.checkpoint)
            self._after_training(data)

    def _fingerprint(self, data: Tensor, epochs: int) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed: the detector and its settings, the epochs already
        in its history, this call's epochs, and the images (shape and a checksum)."""
        params = self.get_params() if hasattr(self, "get_params") else {}
        return {"detector": getattr(self, "name", type(self).__name__),
                "params": {k: repr(v) for k, v in sorted(params.items()) if k != "device"},
                "history_before": len(self.history_), "epochs": int(epochs), "data_shape": list(data.shape),
                "data_sum": float(data.double().sum()), "data_abs_sum": float(data.double().abs().sum())}

    def _run_checkpointed(self, run: Step, loader: Batches, data: Tensor, epochs: int, desc: str,
                          generator: torch.Generator, checkpoint: Checkpoint) -> list[dict[str, float]]:
        """`run_epochs` that resumes from and writes to `checkpoint` (see `Checkpoint`)."""
        fingerprint = self._fingerprint(data, epochs)
        done: list[dict[str, float]] = []
        elapsed = 0.0
        state = checkpoint.read()
        if state is not None:
            if state.get("fingerprint") != fingerprint:
                theirs = state.get("fingerprint") or {}
                differ = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
                raise LoadError(f"{checkpoint.path} was written by another training run (it differs in "
                                f"{', '.join(differ)}); remove it or choose another checkpoint path")
            for name, net in self._nets().items():
                net.load_state_dict(state["nets"][name])
            for name, opt in self.optimizers_.items():
                opt.load_state_dict(state["optimizers"][name])
            match_state_layout(self.optimizers_.values())  # loaded moments take their parameters' layout
            for attr, value in state["fitted"].items():
                setattr(self, attr, value)
            _set_rng_state(state["rng"], generator)
            done, elapsed = list(state["history"]), float(state["elapsed_s"])
            log.info("%s: resuming from %s after %d of %d epochs", desc, checkpoint.path, len(done), epochs)
        checkpoint.resumed_epochs, checkpoint.elapsed_before_s = len(done), elapsed
        start = last_write = time.monotonic()

        def save() -> None:
            nonlocal last_write
            checkpoint.write({
                "fingerprint": fingerprint, "history": done, "elapsed_s": elapsed + time.monotonic() - start,
                "nets": {name: net.state_dict() for name, net in self._nets().items()},
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers_.items()},
                "fitted": {attr: getattr(self, attr) for attr in getattr(self, "_fitted_json", ())
                           if attr != "history_" and hasattr(self, attr)},
                "rng": _rng_state(generator)})
            last_write = time.monotonic()

        def on_epoch_end(epoch: int, means: dict[str, float]) -> None:
            done.append(means)
            if len(done) < epochs and time.monotonic() - last_write >= checkpoint.every_s:
                save()

        remaining = epochs - len(done)
        if remaining > 0:
            run_epochs(run, loader, remaining, progress=self.progress, desc=desc, on_epoch_end=on_epoch_end)
            save()
        return done

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
