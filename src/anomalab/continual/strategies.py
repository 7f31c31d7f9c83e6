"""Continual-learning strategies that wrap a trainable detector's training step (docs/continual.md).

Each strategy changes one of three things while task i > 1 trains, and nothing else:
- the training data of the task (`training_data`): joint adds every earlier task's images;
- each mini-batch (`extend_batch`): replay appends images decoded by a frozen decoder;
- the loss (`penalty`): EWC adds a Fisher-weighted quadratic penalty.
`begin_task` / `end_task` run before / after a task's training. Which strategies a detector takes is
its `continual_strategies` (the `Trainable` protocol); `check` refuses any other with a
`StrategyError` that says why. Changing the loss needs a detector trained by one loss and one
optimiser (`SingleLoss`: conv_ae, vae); the GANs' adversarial steps take only strategies that change
the data (finetune, joint; replay for a GAN that samples from its prior, anogan).

- finetune (lower bound): train on the new task only.
- joint (upper bound): train on all tasks seen so far (needs the earlier data).
- ewc (Kirkpatrick et al. 2017): after each task, the diagonal Fisher F of the task's loss at the
  current parameters; while training later tasks the loss gets  ewc_lambda * sum F * (theta - theta*)^2,
  theta* = the parameters at the end of the previous task. Our choice, "online" EWC (Schwarz et al.
  2018): one penalty whose F is the sum over all earlier tasks (times fisher_decay per new task; 1 =
  plain sum) and whose anchor is the latest end-of-task parameters, so memory does not grow with tasks.
- replay (Wiewel & Yang 2019, generative replay with the VAE itself): a frozen copy of the decoder
  (`prior_decoder()`; AnoGAN's G, as in deep generative replay, Shin et al. 2017) from the end of the
  previous task decodes batch_size * replay_fraction images from z ~ N(0, I), appended to every real
  batch. The copy is taken when a task begins, which is the end of the previous one, so nothing has
  to be stored between tasks.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from anomalab.detector import Generative, Trainable
from anomalab.errors import StrategyError  # noqa: F401  (re-exported: anomalab.continual.strategies.StrategyError)
from anomalab.train.epochs import SingleLoss


def trainable_parameters(detector) -> dict[str, nn.Parameter]:
    """name -> parameter of every network the detector saves, named as in its weights file."""
    return {f"{net_name}.{k}": p for net_name, net in detector._nets().items()
            for k, p in net.named_parameters() if p.requires_grad}


def nbytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


class Strategy:
    """Base: plain training on the new task (this is `finetune`)."""

    name: ClassVar[str] = "finetune"

    def check(self, detector) -> None:
        """Raise StrategyError unless this strategy can train `detector` (its `continual_strategies`)."""
        name = getattr(detector, "name", type(detector).__name__)
        if not isinstance(detector, Trainable):
            raise StrategyError(f"continual learning needs a gradient-trained detector that trains further "
                                f"with train_more(); '{name}' is not one (try 'vae' or 'conv_ae')")
        supported = tuple(detector.continual_strategies)
        reason = self.refusal(detector, name)
        if reason is None and self.name not in supported:
            reason = f"'{name}' does not support the {self.name} strategy"
        if reason is not None:
            raise StrategyError(f"{reason}; '{name}' supports {', '.join(supported) or 'no strategy'}")

    def refusal(self, detector, name: str) -> str | None:
        """Why this strategy cannot train `detector` (named `name`), from what it needs of the detector;
        None when the detector has that."""
        return None

    def get_params(self) -> dict[str, Any]:
        return {}

    def needs_earlier_data(self) -> bool:
        """True when the strategy lacks what it needs from earlier tasks (a loaded joint or a fresh ewc)."""
        return False

    def begin_task(self, detector, task_index: int) -> None:
        """Before training task `task_index` (0-based; called for task_index >= 1 only)."""

    def training_data(self, x: Tensor) -> Tensor:
        """The images the task trains on, given the new task's prepared images x (N, C, H, W)."""
        return x

    def task_epochs(self, epochs: int, n_new: int, n_train: int) -> int:
        """Epochs over the training data for a task of n_new new images and n_train training images."""
        return epochs

    def extend_batch(self, batch: Tensor) -> Tensor:
        return batch

    def penalty(self, detector) -> Tensor | None:
        return None

    def end_task(self, detector, x: Tensor) -> None:
        """After training a task on its prepared images x (also after the first task)."""

    def memory_bytes(self) -> int:
        """Bytes this strategy keeps between tasks (stored data, Fisher, decoder copy)."""
        return 0

    # ---- persistence (safetensors + JSON, no pickle) -----------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, tensors: dict[str, Tensor], detector) -> None:
        """Restore what `state_tensors` saved, on the detector's device."""


class Finetune(Strategy):
    """Lower bound: train on the new task only."""

    name = "finetune"


class Joint(Strategy):
    """Upper bound: train on the union of all tasks seen so far. Keeps every earlier task's images.

    equal_steps False: `epochs` passes over the union (task i costs about i times a finetune task).
    equal_steps True: round(epochs * n_new / n_union) passes (at least 1), so every task takes about the
    same number of optimiser steps as the other strategies: the upper bound at equal compute."""

    name = "joint"

    def __init__(self, memory: list[Tensor] | None = None, equal_steps: bool = False):
        self.memory: list[Tensor] = list(memory or [])
        self.equal_steps = equal_steps

    def get_params(self) -> dict[str, Any]:
        return {"equal_steps": self.equal_steps}

    def task_epochs(self, epochs: int, n_new: int, n_train: int) -> int:
        return max(1, round(epochs * n_new / n_train)) if self.equal_steps else epochs

    def needs_earlier_data(self) -> bool:
        return not self.memory

    def training_data(self, x: Tensor) -> Tensor:
        return torch.cat([*self.memory, x]) if self.memory else x

    def end_task(self, detector, x: Tensor) -> None:
        self.memory.append(x)

    def memory_bytes(self) -> int:
        return nbytes(self.memory)


def ewc_penalty(params: dict[str, Tensor], anchor: dict[str, Tensor], fisher: dict[str, Tensor],
                ewc_lambda: float) -> Tensor:
    """ewc_lambda * sum_k F_k (theta_k - theta*_k)^2 over every named parameter (Kirkpatrick 2017, eq. 3
    without the 1/2, which ewc_lambda absorbs)."""
    total = sum((fisher[k] * (p - anchor[k]).pow(2)).sum() for k, p in params.items())
    return ewc_lambda * total


def diagonal_fisher(detector, x: Tensor, n_samples: int = 200, seed: int = 0) -> dict[str, Tensor]:
    """Empirical diagonal Fisher: mean over n_samples images of x of the squared gradient of the
    detector's per-image loss, with networks in eval mode (BatchNorm on its running statistics, as at
    test time). Returns name -> tensor shaped like each parameter."""
    params = trainable_parameters(detector)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=generator)[: min(n_samples, len(x))]
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    nets = list(detector._nets().values())
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    torch.manual_seed(seed)  # the VAE's posterior sample
    try:
        for i in idx.tolist():
            loss, _ = detector.loss(x[i : i + 1].to(detector.device_))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (k, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    fisher[k] += g.detach().pow(2)
    finally:
        for net, mode in zip(nets, modes, strict=True):
            net.train(mode)
    return {k: f / len(idx) for k, f in fisher.items()}


class EWC(Strategy):
    """Elastic weight consolidation, online form (see the module doc)."""

    name = "ewc"

    def __init__(self, ewc_lambda: float = 100.0, fisher_samples: int = 200, fisher_decay: float = 1.0):
        self.ewc_lambda = ewc_lambda  # lambda: weight of the quadratic penalty
        self.fisher_samples = fisher_samples  # images per task used to estimate the diagonal Fisher
        self.fisher_decay = fisher_decay  # gamma of online EWC: F <- gamma * F + F_new (1 = plain sum)
        self.fisher: dict[str, Tensor] | None = None
        self.anchor: dict[str, Tensor] | None = None
        self.tasks_done = 0

    def get_params(self) -> dict[str, Any]:
        return {"ewc_lambda": self.ewc_lambda, "fisher_samples": self.fisher_samples,
                "fisher_decay": self.fisher_decay}

    def needs_earlier_data(self) -> bool:
        return self.fisher is None

    def refusal(self, detector, name: str) -> str:
        if not isinstance(detector, SingleLoss):
            return (f"ewc adds a Fisher-weighted penalty to the one loss that a detector's one optimiser "
                    f"minimises, and takes the Fisher from that loss; '{name}' has no such loss: its step "
                    f"trains networks against each other (adversarially), each with its own optimiser")
        return None

    def begin_task(self, detector, task_index: int) -> None:
        if self.fisher is None:
            raise StrategyError("ewc has no Fisher information of the earlier tasks: it is computed at the "
                                "end of each task; continue from a run trained with --strategy ewc, or "
                                "give the earlier task's data")
        # theta*: the parameters at the end of the previous task (= now)
        self.anchor = {k: p.detach().clone() for k, p in trainable_parameters(detector).items()}

    def penalty(self, detector) -> Tensor | None:
        if self.fisher is None or self.anchor is None:
            return None
        return ewc_penalty(trainable_parameters(detector), self.anchor, self.fisher, self.ewc_lambda)

    def end_task(self, detector, x: Tensor) -> None:
        new = diagonal_fisher(detector, x, self.fisher_samples, seed=detector.seed + self.tasks_done)
        if self.fisher is None:
            self.fisher = new
        else:
            self.fisher = {k: self.fisher_decay * f + new[k] for k, f in self.fisher.items()}
        self.tasks_done += 1

    def memory_bytes(self) -> int:
        # the Fisher and the anchor: two copies of the parameters
        return 2 * nbytes(self.fisher.values()) if self.fisher else 0

    def state_tensors(self) -> dict[str, Tensor]:
        if self.fisher is None:
            return {}
        out = {f"fisher.{k}": f.detach().cpu().contiguous() for k, f in self.fisher.items()}
        out["tasks_done"] = torch.tensor(self.tasks_done)
        return out

    def load_state(self, tensors: dict[str, Tensor], detector) -> None:
        fisher = {k[len("fisher."):]: v.to(detector.device_) for k, v in tensors.items()
                  if k.startswith("fisher.")}
        if fisher:
            expected = set(trainable_parameters(detector))
            if set(fisher) != expected:
                raise StrategyError("saved EWC Fisher does not match the detector's parameters")
            self.fisher = fisher
            self.tasks_done = int(tensors.get("tasks_done", torch.tensor(1)))


class Replay(Strategy):
    """Generative replay with the detector's own decoder (Wiewel & Yang 2019)."""

    name = "replay"

    def __init__(self, replay_fraction: float = 0.5):
        # replayed images per step = batch_size * replay_fraction (source: batch_size / 2)
        self.replay_fraction = replay_fraction
        self.decoder: nn.Module | None = None  # the frozen copy, set when a task begins
        self.generator: torch.Generator | None = None
        self.n_replay = 0
        self.latent_dim = 0
        self.device = torch.device("cpu")

    def get_params(self) -> dict[str, Any]:
        return {"replay_fraction": self.replay_fraction}

    def refusal(self, detector, name: str) -> str:
        if not (isinstance(detector, Generative) and hasattr(detector, "prior_decoder")):
            return (f"replay needs a detector that decodes images from a prior z ~ N(0, I) "
                    f"(Generative.sample and prior_decoder(), e.g. 'vae', 'anogan'); '{name}' offers no "
                    f"prior to sample from")
        return None

    def begin_task(self, detector, task_index: int) -> None:
        # the decoder as it is at the end of the previous task, frozen for the whole task
        self.decoder = copy.deepcopy(detector.prior_decoder()).eval().requires_grad_(False)
        self.latent_dim = int(detector.latent_dim)
        self.device = detector.device_
        self.n_replay = max(1, int(round(detector.batch_size * self.replay_fraction)))
        self.generator = torch.Generator().manual_seed(int(detector.seed) * 1000 + task_index)

    def replay_samples(self, n: int) -> Tensor:
        """n images decoded by the frozen decoder from z ~ N(0, I)."""
        z = torch.randn(n, self.latent_dim, generator=self.generator).to(self.device)
        with torch.no_grad():
            return self.decoder(z)

    def extend_batch(self, batch: Tensor) -> Tensor:
        if self.decoder is None:
            return batch
        return torch.cat([batch, self.replay_samples(self.n_replay).to(batch)])

    def memory_bytes(self) -> int:
        return 0 if self.decoder is None else nbytes(self.decoder.state_dict().values())


STRATEGIES: dict[str, type[Strategy]] = {"finetune": Finetune, "joint": Joint, "ewc": EWC, "replay": Replay}


def make_strategy(name: str, **params: Any) -> Strategy:
    """A strategy by name: make_strategy("ewc", ewc_lambda=100.0)."""
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy '{name}'; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**params)
