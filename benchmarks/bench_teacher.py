"""The beta-VAE teacher's training step on dSprites (64 x 64, batch 64): `BetaVAE.train_more` against the
step it replaced, measured in the same run.

- "previous step": the default memory layout and torch's default (foreach) Adam, as the teacher trained
  before; a plain loop over the same nets, loss and rendered batches;
- "BetaVAE.train_more": the teacher as it trains now (channels_last while training, fused Adam), with its
  rendering, logging and progress bookkeeping included.
FLOPs per image (torch.utils.flop_counter) give the achieved GFLOP/s. Runs are interleaved (order reversed
every other round); the median counts. On a shared machine compare the ratio, not absolute numbers.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_teacher.py [--threads 1] [--steps 60] [--repeats 3]

`--layers` prints where a step's time goes instead: each conv layer's forward and backward time inside
the real step (module hooks, channels_last, median over steps) and its achieved GFLOP/s, which shows
how close each layer runs to the CPU's arithmetic limit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _common import timed  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from anomalab.generate.beta_vaegan import BetaVAE  # noqa: E402
from anomalab.generate.beta_vaegan.losses import bernoulli_nll, kl_to_standard_normal  # noqa: E402


def previous_loop(steps: int, seed: int = 0) -> None:
    """The teacher's former step, written out: default layout, default Adam, the same batches."""
    det = BetaVAE(seed=seed).start()
    e, d = det.encoder_, det.decoder_
    opt = torch.optim.Adam([*e.parameters(), *d.parameters()], lr=det.lr)
    rng = np.random.default_rng([seed, 0])
    for _ in range(steps):
        x = det.data_.sample(det.batch_size, rng)[0]
        opt.zero_grad(set_to_none=True)
        mean, logvar = e(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        loss = bernoulli_nll(d(z), x).mean() + det.beta * kl_to_standard_normal(mean, logvar).mean()
        loss.backward()
        opt.step()
        loss.item()  # the logged value, as train_more logs it


def current(steps: int, seed: int = 0) -> None:
    det = BetaVAE(seed=seed).start()
    det.progress = False
    det.train_more(steps)


def flops_per_image() -> float:
    det = BetaVAE().start()
    x = det.data_.sample(det.batch_size, np.random.default_rng(0))[0]
    with FlopCounterMode(display=False) as fc:
        det.loss(x)[0].backward()
    return fc.get_total_flops() / len(x)


def _conv_flops(m: torch.nn.Module, x_shape: torch.Size, y_shape: torch.Size) -> float:
    """Forward FLOPs (2 per multiply-add) of a Conv2d / ConvTranspose2d from its input and output shapes."""
    k = m.kernel_size[0] * m.kernel_size[1]
    spatial = y_shape[2] * y_shape[3] if isinstance(m, torch.nn.Conv2d) else x_shape[2] * x_shape[3]
    return 2.0 * x_shape[0] * spatial * m.in_channels * m.out_channels * k


def layer_profile(steps: int) -> None:
    """Per conv layer of the teacher's step: forward / backward ms (hooks around each module, inside the real
    channels_last training step) and the achieved GFLOP/s (FLOPs from the layer's shapes; the backward is the
    weight gradient plus, past the first layer, the input gradient: 2x the forward's FLOPs, 1x for the first).
    The first layer's backward runs inside autograd with no input gradient, where module hooks cannot time it."""
    det = BetaVAE(seed=0).start()
    nets = {"encoder": det.encoder_, "decoder": det.decoder_}
    for net in nets.values():
        net.to(memory_format=torch.channels_last).train()
    layers = {f"{k}.{n}": m for k, net in nets.items() for n, m in net.named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))}
    first = next(iter(layers))
    fwd: dict[str, list[float]] = {k: [] for k in layers}
    bwd: dict[str, list[float]] = {k: [] for k in layers}
    flops: dict[str, float] = {}
    start: dict[object, float] = {}

    def after(m, i, o, name):
        fwd[name].append(time.perf_counter() - start[m])
        flops[name] = _conv_flops(m, i[0].shape, o.shape)

    for name, m in layers.items():
        m.register_forward_pre_hook(lambda m, i: start.__setitem__(m, time.perf_counter()))
        m.register_forward_hook(lambda m, i, o, name=name: after(m, i, o, name))
        if name != first:
            m.register_full_backward_pre_hook(lambda m, g: start.__setitem__((m, "b"), time.perf_counter()))
            m.register_full_backward_hook(
                lambda m, gi, go, name=name: bwd[name].append(time.perf_counter() - start[(m, "b")]))
    rng = np.random.default_rng(0)
    for i in range(steps + 5):
        if i == 5:  # warm-up steps not counted
            for v in (*fwd.values(), *bwd.values()):
                v.clear()
        x = det.data_.sample(det.batch_size, rng)[0].contiguous(memory_format=torch.channels_last)
        det.optimizer_.zero_grad(set_to_none=True)
        det.loss(x)[0].backward()
        det.optimizer_.step()
    print(f"conv layers of one teacher step (batch {det.batch_size}, channels_last), median of {steps} steps:")
    print(f"  {'layer':18s} {'':22s} {'fwd ms':>7s} {'bwd ms':>7s} {'fwd GFLOP/s':>12s} {'bwd GFLOP/s':>12s}")
    total_ms = 0.0
    for name, m in layers.items():
        f_ms = statistics.median(fwd[name]) * 1e3
        b_ms = statistics.median(bwd[name]) * 1e3 if bwd[name] else float("nan")
        total_ms += f_ms + (0.0 if name == first else b_ms)
        kind = f"{m.in_channels}->{m.out_channels} {type(m).__name__.replace('2d', '')}"
        b_rate = "-" if name == first else f"{2 * flops[name] / b_ms / 1e6:.1f}"
        print(f"  {name:18s} {kind:22s} {f_ms:7.2f} {b_ms:7.2f} {flops[name] / f_ms / 1e6:12.1f} {b_rate:>12s}")
    print(f"  timed conv work: {total_ms:.1f} ms per step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the background job's setting: 1)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", action="store_true", help="per conv layer: time and GFLOP/s inside the step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, load average at start {os.getloadavg()}")
    if args.layers:
        layer_profile(args.steps)
        return
    runs = {"previous step": previous_loop, "BetaVAE.train_more": current}
    for fn in runs.values():
        fn(3)  # warm-up (kernel selection, allocator)
    times: dict[str, list[float]] = {k: [] for k in runs}
    items = list(runs.items())
    for r in range(args.repeats):
        for k, fn in items if r % 2 == 0 else items[::-1]:
            times[k].append(timed(lambda fn=fn: fn(args.steps)))
    gflop = flops_per_image() / 1e9
    batch = BetaVAE().batch_size
    print(f"\nbeta-VAE teacher, dSprites 64x64, batch {batch}, {args.steps} steps, median of {args.repeats}; "
          f"{gflop:.4f} GFLOP per image per step")
    rate = {}
    for k, ts in times.items():
        rate[k] = args.steps / statistics.median(ts)
        print(f"  {k:20s} {rate[k]:6.2f} steps/s  {rate[k] * batch:7.0f} images/s  "
              f"{rate[k] * batch * gflop:5.1f} GFLOP/s  (runs: {', '.join(f'{t:.1f}' for t in ts)} s)")
    print(f"ratio BetaVAE.train_more / previous step: {rate['BetaVAE.train_more'] / rate['previous step']:.2f}  "
          "(target >= 1.5)")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
