"""The beta-VAE teacher's training step on dSprites (64 x 64, batch 64): `BetaVAE.train_more` against the
step it replaced, measured in the same run.

- "previous step": the default memory layout and torch's default (foreach) Adam, as the teacher trained
  before; a plain loop over the same nets, loss and rendered batches;
- "BetaVAE.train_more": the teacher as it trains now (channels_last while training, fused Adam), with its
  rendering, logging and progress bookkeeping included.
FLOPs per image (torch.utils.flop_counter) give the achieved GFLOP/s. Runs are interleaved (order reversed
every other round); the median counts. On a shared machine compare the ratio, not absolute numbers.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_teacher.py [--threads 1] [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the background job's setting: 1)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, load average at start {os.getloadavg()}")
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
