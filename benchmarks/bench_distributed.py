"""2 processes x 1 thread (torchrun, gloo) against 1 process x 2 threads, for a feature fit (gaussian) and a
VAE fit, measured in one run (interleaved repeats, best of each), printed as ratios; then what distributed
fitting communicates, in bytes, for an estimate of scaling to several nodes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distributed.py [--repeats 2] [--images 64] [--digits 2048]

A ratio > 1 means the 2 processes are faster. Each measurement times the fit alone (after a barrier), not
the start of the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from _common import timed  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads

# isort: split
import torch  # noqa: E402

HERE = Path(__file__).resolve()


def _photos(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (0.5 * torch.rand(n, 3, 1, 1, generator=g) + 0.5 * torch.rand(n, 3, 160, 160, generator=g)).clamp(0, 1)


def worker(args) -> None:
    """One measurement: fit both detectors (inside distributed.scope() when launched by torchrun); rank 0
    prints {"gaussian": s, "vae": s}."""
    from anomalab import distributed
    from anomalab.data.mnist import load_mnist
    from anomalab.detectors.gaussian import Gaussian
    from anomalab.detectors.vae import VAE

    g = distributed.init()
    photos = _photos(args.images)
    digits = load_mnist().images[: args.digits]
    out = {}

    def barrier():
        if g is not None:
            torch.distributed.barrier()

    with distributed.scope():
        for name, make, data in (("gaussian", lambda: Gaussian(batch_size=8), photos),
                                 ("vae", lambda: VAE(epochs=args.epochs, batch_size=128), digits)):
            det = make()
            det.progress = False
            barrier()
            out[name] = timed(lambda det=det, data=data: (det.fit(data), barrier()))
    if distributed.rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    distributed.shutdown()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(procs: int, threads: int, args) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    own = [str(HERE), "--worker", "--images", str(args.images), "--digits", str(args.digits),
           "--epochs", str(args.epochs)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master-addr",
            "127.0.0.1", "--master-port", str(_port()), *own] if procs > 1 else [sys.executable, *own])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise SystemExit(f"measurement failed ({procs} x {threads}):\n{done.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def communication() -> list[str]:
    """What one distributed fit sends, from the networks and feature sizes themselves."""
    from anomalab.detectors.gaussian import Gaussian
    from anomalab.detectors.vae import VAE
    from anomalab.nets.effnet_lite0 import LEVEL_CHANNELS

    vae = VAE()
    vae._build(vae._model_shape((1, 28, 28)))
    nets = vae._nets().values()
    params = sum(p.numel() for net in nets for p in net.parameters())
    bn = [m.num_features for net in nets for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    grad_bytes = 4 * params
    bn_bytes = 4 * 4 * sum(bn)  # per BatchNorm layer: sum and squared deviations, forward and backward, float32
    pooled = 8 * sum(LEVEL_CHANNELS)  # float64 pooled features per image (gathered)
    g = Gaussian()
    p, d = (g.image_size // 8) ** 2, 40 + 80  # patch grid of levels 4 + 5 at stride 8, their channels
    moments = 8 * (p * d * d + 2 * p * d + 2 * p)
    ring = "a ring all-reduce sends about 2 (N-1)/N times the buffer per rank and step"
    return [f"vae step: gradient all-reduce {grad_bytes / 1e6:.2f} MB ({params:,} float32 parameters) + BatchNorm "
            f"statistics {bn_bytes / 1e3:.1f} kB in {4 * len(bn)} small all-reduces + 3 logged values; {ring}",
            f"gaussian fit, once: pooled features {pooled / 1e3:.1f} kB per image (gathered) + patch moments "
            f"{moments / 1e6:.1f} MB per rank (all-reduced, float64)",
            "patchcore fit, once: every candidate patch feature (h*w*d float32 per image, 784 x 64 x 4 B = 200 kB at "
            "224 px) gathered, then the coreset indices broadcast; scoring: the rows (name, score) only"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--images", type=int, default=64, help="photos for the gaussian fit (160 px, at 224)")
    ap.add_argument("--digits", type=int, default=2048, help="MNIST digits for the vae fit")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        worker(args)
        return
    best: dict[str, dict[str, float]] = {"1x2": {}, "2x1": {}}
    t0 = time.perf_counter()
    for _ in range(args.repeats):  # interleaved, best of each
        for key, (procs, threads) in (("1x2", (1, 2)), ("2x1", (2, 1))):
            for name, s in measure(procs, threads, args).items():
                best[key][name] = min(s, best[key].get(name, float("inf")))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, best of {args.repeats} "
          f"({time.perf_counter() - t0:.0f} s in all)")
    for name, what in (("gaussian", f"gaussian fit, {args.images} images at 224 px"),
                       ("vae", f"vae fit, {args.digits} digits x {args.epochs} epochs, batch 128")):
        one, two = best["1x2"][name], best["2x1"][name]
        print(f"{what:45s} 1 process x 2 threads / 2 processes x 1 thread = {one / two:.2f} "
              f"({one:.2f} s / {two:.2f} s)")
    print("communicated:")
    for line in communication():
        print("  " + line)


if __name__ == "__main__":
    main()
