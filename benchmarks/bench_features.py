"""Feature extraction speed and the memory of a streamed `gaussian` fit.

1. EfficientNet-Lite0 features of every level at 224 px: batches of several sizes under
   torch.inference_mode (what the detectors do) vs a naive loop, one image at a time with autograd on;
   images/s of each and the ratio to the naive loop, measured in the same run.
2. Peak memory of `Gaussian.fit_batches` on 1,000 images (generated batch by batch, so the input itself is
   never held), in a fresh process: peak RSS growth over the loaded model, beside what holding every
   level's activations of all images would take.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_features.py [--threads 1] [--n-fit 1000]
Reference measured on this machine: Lite0 forward about 30 images/s at 224 px on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from anomalab.nets.effnet_lite0 import LEVEL_CHANNELS, LEVEL_STRIDES, efficientnet_lite0  # noqa: E402


def memory_mib(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process from /proc (Linux). Unlike getrusage's ru_maxrss,
    VmHWM starts afresh in a new program instead of inheriting the parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def speed(n_images: int, n_naive: int, size: int, batch_sizes: list[int]) -> dict:
    """images/s of the naive loop and of inference_mode batches of each size, interleaved in two rounds
    (the best round counts) so a change in machine load hits all of them alike."""
    net = efficientnet_lite0()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_images, 3, size, size, generator=g)
    with torch.inference_mode():
        net.features(images[:2])  # warm-up
    rates: dict[str, float] = {}
    for _ in range(2):
        t0 = time.perf_counter()
        for i in range(n_naive):  # naive: one image per call, autograd bookkeeping on
            feats = net.features(images[i : i + 1])
            _ = [f.mean((2, 3)).detach() for f in feats.values()]
        rates["naive"] = max(rates.get("naive", 0.0), n_naive / (time.perf_counter() - t0))
        for b in batch_sizes:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, n_images, b):
                    net.features(images[i : i + b])
            rates[f"batch {b}"] = max(rates.get(f"batch {b}", 0.0), n_images / (time.perf_counter() - t0))
    return {"size": size, "images_per_s": rates, "ratio_to_naive": {k: v / rates["naive"] for k, v in rates.items()},
            "load_average": os.getloadavg()[0]}


def child_memory(n: int, size: int, batch_size: int) -> None:
    """Run in a fresh process: fit gaussian on n generated images, print peak RSS figures as JSON."""
    from anomalab.detectors.gaussian import Gaussian

    det = Gaussian(image_size=size, batch_size=batch_size)
    det._build(det._model_shape())  # load the weights first so the baseline includes the model
    base = memory_mib("VmRSS")
    g = torch.Generator().manual_seed(0)
    batches = (torch.rand(min(batch_size, n - i), 3, size, size, generator=g) for i in range(0, n, batch_size))
    t0 = time.perf_counter()
    det.fit_batches(batches)
    fit_s = time.perf_counter() - t0
    per_image = sum(c * (-(-size // s)) ** 2 for c, s in zip(LEVEL_CHANNELS, LEVEL_STRIDES)) * 4
    peak = memory_mib("VmHWM")
    print(json.dumps({"n": n, "size": size, "fit_s": fit_s, "rss_before_mib": base, "peak_rss_mib": peak,
                      "growth_mib": peak - base,
                      "all_activations_mib": per_image * n / 2**20,
                      "input_images_mib": n * 3 * size * size * 4 / 2**20}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--n-images", type=int, default=32)
    p.add_argument("--n-naive", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batch-size", type=int, default=8, help="batch of the gaussian fit")
    p.add_argument("--n-fit", type=int, default=1000)
    p.add_argument("--fit-size", type=int, default=224)
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args.n_fit, args.fit_size, args.batch_size)
        return
    s = speed(args.n_images, args.n_naive, args.size, args.batch_sizes)
    print(f"Lite0 features of every level, {s['size']} px, {args.threads} thread(s), load average "
          f"{s['load_average']:.1f}:")
    for k, v in s["images_per_s"].items():
        label = "naive loop, one image per call, autograd on" if k == "naive" else f"inference_mode, {k}"
        print(f"  {label:46s} {v:6.1f} images/s   ratio to naive {s['ratio_to_naive'][k]:.2f}")
    cmd = [sys.executable, __file__, "--child-memory", "--threads", str(args.threads), "--n-fit", str(args.n_fit),
           "--fit-size", str(args.fit_size), "--batch-size", str(args.batch_size)]
    m = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"gaussian fit on {m['n']} images at {m['size']} px (streamed, batch {args.batch_size}): "
          f"{m['fit_s']:.0f} s; peak RSS {m['peak_rss_mib']:.0f} MiB, growth over the loaded model "
          f"{m['growth_mib']:.0f} MiB; holding all activations would take {m['all_activations_mib']:.0f} MiB "
          f"and the prepared inputs {m['input_images_mib']:.0f} MiB")
    print(json.dumps({"speed": s, "memory": m}))


if __name__ == "__main__":
    main()
