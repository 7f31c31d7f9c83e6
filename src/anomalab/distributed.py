"""Fitting and scoring over several processes with `torch.distributed` (launched by `torchrun`).

`torchrun --nproc_per_node N -m anomalab fit|score ...` starts N processes (ranks); each reads the same data
spec and this module makes them cooperate so that the result equals one process's (docs/distributed.md):

- gradient-trained detectors (vae, conv_ae): every global mini-batch of `batch_size` images is split over the
  ranks (`share`: contiguous, sizes differing by at most one); each rank computes the mean loss over its
  share, its gradients are weighted by its share of the batch (n_r / n) and summed over the ranks before every
  optimiser step, so the update is the one of the mean loss over the whole batch. BatchNorm layers in
  training mode normalise with the statistics of the whole global batch (`synced_batchnorm`), and the VAE
  draws its noise for the whole batch and keeps its rows, so every rank computes exactly its slice of the
  single-process step. Rule: every mini-batch needs at least one image per rank (checked before training).
- feature detectors (gaussian, padim, patchcore): rank r extracts the features of the batches r, r + N, ...
  (`my_batches`); streamed moment sums are all-reduced (`all_reduce_moments`), pooled features and patchcore's
  candidates gathered back into the original order (`gather_in_order`), and the coreset selected once over all
  candidates (on rank 0, broadcast).
- scoring: rank r scores the files r, r + N, ...; rank 0 merges the rows back into the input order.

Rank 0 alone writes outputs. Errors: the steps that can fail on one rank only are run through `agree`, so
every rank stops there, with the failing rank's message (`DistributedError` on the others, which the CLI does
not print again). Outside `scope()` everything runs locally, so code reached by rank 0 alone (threshold
cross-fitting, evaluation) never waits for the other ranks.
"""

from __future__ import annotations

import datetime
import os
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from anomalab.errors import NotSupportedError, UserError

T = TypeVar("T")

# what the CLI runs under torchrun; every other command refuses (one line, before any work)
DISTRIBUTED_COMMANDS = ("fit", "score")
DISTRIBUTED_DETECTORS = ("conv_ae", "vae", "ganomaly", "skip_ganomaly", "anogan", "gaussian", "padim", "patchcore")


class DistributedError(UserError, RuntimeError):
    """Another rank failed: the message is that rank's (the CLI prints it only on the failing rank)."""


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int


_GROUP: Group | None = None  # the initialised process group of this process
_ACTIVE: Group | None = None  # set inside scope(): fits and training cooperate over the ranks
_SHARE: Share | None = None  # the current training step's share of the global batch


@dataclass(frozen=True)
class Share:
    """This rank's rows [start, stop) of a global mini-batch of `total` rows."""

    start: int
    stop: int
    total: int

    @property
    def weight(self) -> float:
        return (self.stop - self.start) / self.total


def launched() -> bool:
    """True in a process started by torchrun (or with RANK / WORLD_SIZE set) with more than one rank."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_s: float | None = None) -> Group | None:
    """Join the process group torchrun describes (gloo for CPU tensors, NCCL for CUDA tensors when GPUs are
    present; each rank on cuda:LOCAL_RANK); None when not launched with several ranks. Idempotent."""
    global _GROUP
    if _GROUP is not None or not launched():
        return _GROUP
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        timeout = datetime.timedelta(seconds=float(timeout_s or os.environ.get("ANOMALAB_DIST_TIMEOUT", 1800)))
        dist.init_process_group(backend, timeout=timeout)
    _GROUP = Group(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)
    return _GROUP


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    global _GROUP
    import torch.distributed as dist

    if _GROUP is not None and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None


def group() -> Group | None:
    """The process group this process joined (`init`), or None."""
    return _GROUP


def rank() -> int:
    return 0 if _GROUP is None else _GROUP.rank


def active() -> Group | None:
    """The group when inside `scope()` (fits cooperate over the ranks), else None (everything local)."""
    return _ACTIVE


@contextmanager
def scope() -> Iterator[Group | None]:
    """Within it, `fit` and training of the distributable detectors run over all ranks (no-op without a group)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, _GROUP
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous


def batch_share() -> Share | None:
    """This rank's share of the global mini-batch while a distributed training step runs, else None."""
    return _SHARE


def batch_randn(n: int, *shape: int, **kwargs: Any) -> Tensor:
    """torch.randn(n, *shape) for a training step's batch of n images; during a distributed step, the rows of
    this rank's share of the draw for the whole global batch (so the noise equals one process's). The hook a
    detector's `_train_step` uses to become exact over ranks (then it may set `distributable = True`)."""
    share = _SHARE
    if share is None:
        return torch.randn(n, *shape, **kwargs)
    return torch.randn(share.total, *shape, **kwargs)[share.start : share.stop]


def batch_mean(value: float) -> float:
    """A per-image mean a training step computed on its batch (e.g. a loss's value): during a distributed step,
    the mean over the whole global batch (the ranks' values weighted by their shares, summed), so a decision
    taken on it (GANomaly re-initialising D) is the same on every rank and equals one process's."""
    share = _SHARE
    if share is None:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value) * share.weight], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def check_supported(det: Any) -> None:
    """NotSupportedError (one line) for a detector that cannot be fitted over several ranks."""
    if not getattr(det, "distributable", False):
        raise NotSupportedError(f"{det.name} cannot be fitted under torchrun (its result would differ from one "
                                f"process's); distributed fitting supports {', '.join(DISTRIBUTED_DETECTORS)}: "
                                f"run {det.name} in one process")


# ---- agreement on errors ----------------------------------------------------------------------------
def agree(fn: Callable[[], T], g: Group | None = None) -> T:
    """Run fn() on every rank, then exchange the outcomes: if any rank failed, every rank raises (the lowest
    failing rank its own exception, the others a DistributedError with its message); else return fn()'s
    result. Without a group, just fn()."""
    g = g or _GROUP
    if g is None:
        return fn()
    import torch.distributed as dist

    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the other ranks
        error = e
    status = None if error is None else (_describe(error))
    statuses: list[Any] = [None] * g.world
    dist.all_gather_object(statuses, status)
    failed = [r for r, s in enumerate(statuses) if s is not None]
    if not failed:
        return result
    first = failed[0]
    if first == g.rank:
        raise error  # type: ignore[misc]
    raise DistributedError(f"rank {first}: {statuses[first]}") from error


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"


def raise_everywhere(error: Exception) -> None:
    """Raise an error every rank detects identically: rank 0 its own, the others a DistributedError (so the
    CLI prints it once)."""
    if rank() == 0:
        raise error
    raise DistributedError(f"rank 0: {_describe(error)}") from error


# ---- feature detectors ------------------------------------------------------------------------------
def my_batches(batches: Iterable[T], g: Group) -> Iterator[T]:
    """The batches r, r + N, r + 2N, ... of rank r (every batch keeps its images, so features equal one
    process's)."""
    for i, batch in enumerate(batches):
        if i % g.world == g.rank:
            yield batch


def gather_in_order(parts: list[Tensor], g: Group) -> list[Tensor]:
    """Every rank's `parts` (one per batch of `my_batches`), on every rank, in the original batch order."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * g.world
    dist.all_gather_object(everyone, [p.cpu() for p in parts])
    out = []
    for i in range(sum(len(p) for p in everyone)):
        out.append(everyone[i % g.world][i // g.world])
    return out


def all_reduce_moments(moments: Any, g: Group) -> None:
    """Sum `gaussian._Moments` over the ranks in place (float64), ranks without images included."""
    import torch.distributed as dist

    shapes: list[Any] = [None] * g.world
    dist.all_gather_object(shapes, None if moments.s1 is None else tuple(moments.s1.shape))
    shape = next((s for s in shapes if s is not None), None)
    if shape is None:
        return
    if moments.s1 is None:
        p, d = shape
        z = torch.zeros
        moments.s1, moments.s2 = z(p, d, dtype=torch.float64), z(p, d, d, dtype=torch.float64)
        if moments.lw:
            moments.sa, moments.sa2, moments.sax = (z(p, dtype=torch.float64), z(p, dtype=torch.float64),
                                                    z(p, d, dtype=torch.float64))
    for name in ("s1", "s2", *(("sa", "sa2", "sax") if moments.lw else ())):
        dist.all_reduce(getattr(moments, name))
    n = torch.tensor([moments.n], dtype=torch.int64)
    dist.all_reduce(n)
    moments.n = int(n)


def broadcast_tensor(t: Tensor | None, g: Group, src: int = 0) -> Tensor:
    """Rank `src`'s tensor on every rank (its shape and dtype sent first)."""
    import torch.distributed as dist

    meta: list[Any] = [None if t is None else (tuple(t.shape), t.dtype)]
    dist.broadcast_object_list(meta, src=src)
    shape, dtype = meta[0]
    buf = t.contiguous() if g.rank == src else torch.empty(shape, dtype=dtype)
    dist.broadcast(buf, src=src)
    return buf


# ---- gradient-trained detectors ---------------------------------------------------------------------
def share_of(total: int, g: Group) -> Share:
    """Rank r's contiguous rows of a batch of `total`: sizes total // N, the first total % N ranks one more."""
    base, extra = divmod(total, g.world)
    start = g.rank * base + min(g.rank, extra)
    return Share(start, start + base + (g.rank < extra), total)


def check_batches(n: int, batch_size: int, g: Group, owner: str) -> None:
    """The rule of distributed training: every mini-batch has at least one image per rank."""
    from anomalab.errors import ParameterError

    last = n % batch_size
    if batch_size < g.world or 0 < last < g.world:
        small = batch_size if batch_size < g.world else last
        raise ParameterError(f"{owner}: a mini-batch of {small} images cannot be split over {g.world} processes "
                             f"({n} images, batch_size {batch_size}): every mini-batch needs at least one image "
                             "per process; choose another batch_size or fewer processes")


class _WeightedAllReduce(torch.autograd.Function):
    """Sum over the ranks. Backward: each rank's loss is the mean over its own share, weighted later by
    w_r = n_r / n; the gradient of the whole batch's loss at the sum is sum_s w_s g_s, given to rank r
    divided by w_r (its gradients are multiplied by w_r before they are summed)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: float) -> Tensor:
        import torch.distributed as dist

        ctx.weight = weight
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        out = grad * ctx.weight
        dist.all_reduce(out)
        return out / ctx.weight, None


def _synced_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """BatchNorm in training mode with the mean and (biased) variance of the whole global batch, and the
    running statistics updated with them as one process would (unbiased variance over the global count)."""
    share = _SHARE
    if not self.training or share is None:
        return type(self).forward(self, x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = share.total * (x.numel() // max(1, len(x) * x.shape[1]))  # images x positions of the global batch
    mean = _WeightedAllReduce.apply(x.sum(dims), share.weight) / count
    var = _WeightedAllReduce.apply((x - mean.view(shape)).pow(2).sum(dims), share.weight) / count
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
            self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            self.running_var.mul_(1 - factor).add_(var.detach() * count / max(count - 1, 1), alpha=factor)
    return y


@contextmanager
def synced_training(nets: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    g: Group) -> Iterator[Callable[[Tensor, Callable[[Tensor], dict[str, float]]], dict[str, float]]]:
    """For the duration: networks' parameters and buffers broadcast from rank 0 (same start everywhere),
    BatchNorm layers synced, every optimiser's step preceded by the weighted gradient sum. Yields
    run(batch, step) -> logs: the step on this rank's share of the global batch, its logged values the
    weighted sums over the ranks (the whole batch's means)."""
    import torch.distributed as dist

    global _SHARE
    for net in nets.values():
        for t in [*net.parameters(), *net.buffers()]:
            dist.broadcast(t.data, src=0)
    patched_bn = [m for net in nets.values() for m in net.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in patched_bn:
        m.forward = types.MethodType(_synced_bn_forward, m)

    def synced_step(opt: torch.optim.Optimizer):
        original = opt.step

        def step(*args, **kwargs):
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            if params:
                flat = torch.cat([p.grad.reshape(-1) for p in params]) * _SHARE.weight
                dist.all_reduce(flat)
                i = 0
                for p in params:
                    k = p.grad.numel()
                    p.grad.copy_(flat[i : i + k].view_as(p.grad))
                    i += k
            return original(*args, **kwargs)

        return step

    for opt in optimizers.values():
        opt.step = synced_step(opt)

    def run(batch: Tensor, step: Callable[[Tensor], dict[str, float]]) -> dict[str, float]:
        global _SHARE
        _SHARE = share_of(len(batch), g)
        try:
            logs = step(batch[_SHARE.start : _SHARE.stop])
            keys = sorted(logs)
            values = torch.tensor([float(logs[k]) * _SHARE.weight for k in keys], dtype=torch.float64)
            dist.all_reduce(values)
            return dict(zip(keys, values.tolist()))
        finally:
            _SHARE = None

    try:
        yield run
    finally:
        _SHARE = None
        for m in patched_bn:
            del m.forward
        for opt in optimizers.values():
            del opt.step
