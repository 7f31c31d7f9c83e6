"""GANomaly training throughput and AnoGAN batched latent search, each against a baseline in the same run.

1. `GANomaly.fit` (whole call: checks, resize 28 -> 32, nets, training) in images/s, beside minimal plain
   PyTorch loops over the same G and D at 32x32, batch 64, on the same images:
   - "plain, same step": the update anomalab uses, written inline (ratio fit / this = framework overhead);
   - "plain, official step": the official code's step (G update, then D update; D run four times per
     step) - the usual way to write it;
   - "plain, same step, channels_last": the same with the channels_last memory format, as `fit` trains.
   FLOPs per image (torch.utils.flop_counter) of each step and the achieved GFLOP/s.
2. AnoGAN scoring: one Adam over the (N, nz) latents of a whole batch vs one image at a time, each with
   and without BatchNorm folded into the convs (what `AnoGAN.search` runs: anomalab.nets.fold).

Runs are interleaved (order reversed every other round) and repeated; the median is reported. Load
average is printed: on a shared machine compare ratios, not absolute numbers.
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_ganomaly.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics

from _common import timed  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from anomalab.data.mnist import load_mnist  # noqa: E402
from anomalab.detectors.anogan import AnoGAN, latent_search  # noqa: E402
from anomalab.detectors.ganomaly import GANomaly, GanomalyGenerator  # noqa: E402
from anomalab.nets.dcgan import DCDiscriminator, dcgan_init  # noqa: E402
from anomalab.nets.fold import fold_batchnorm  # noqa: E402

SIZE, NZ, WIDTH, BATCH = 32, 100, 64, 64


def nets(seed: int = 0):
    torch.manual_seed(seed)
    g, d = GanomalyGenerator(SIZE, 1, NZ, WIDTH), DCDiscriminator(SIZE, 1, WIDTH)
    g.apply(dcgan_init)
    d.apply(dcgan_init)
    return g, d


def adams(g, d):
    return (torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999), fused=True),
            torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999), fused=True))


def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def same_step(g, d, og, od, x):
    x_hat, z, z_hat = g(x)
    lr_, fr = d(x)
    lf, ff = d(x_hat)
    loss_g = (fr.detach() - ff).pow(2).mean() + 50 * (x - x_hat).abs().mean() + (z - z_hat).pow(2).mean()
    loss_d = 0.5 * (bce(lr_, 1.0) + bce(lf, 0.0))
    og.zero_grad()
    od.zero_grad()
    loss_g.backward(inputs=list(g.parameters()), retain_graph=True)
    loss_d.backward(inputs=list(d.parameters()))
    og.step()
    od.step()
    if loss_d.item() < 1e-5:
        d.apply(dcgan_init)


def official_step(g, d, og, od, x):
    x_hat, z, z_hat = g(x)  # forward_g
    pred_real, _ = d(x)  # forward_d
    pred_fake, _ = d(x_hat.detach())
    og.zero_grad()  # backward_g: D run again on x and x_hat
    loss_g = ((d(x)[1] - d(x_hat)[1]).pow(2).mean() + 50 * (x - x_hat).abs().mean() + (z - z_hat).pow(2).mean())
    loss_g.backward(retain_graph=True)
    og.step()
    od.zero_grad()
    loss_d = 0.5 * (bce(pred_real, 1.0) + bce(pred_fake, 0.0))
    loss_d.backward()
    od.step()
    if loss_d.item() < 1e-5:
        d.apply(dcgan_init)


def plain_fit(images, step, channels_last=False):
    """A minimal loop: resize once, shuffle, slice batches, step."""
    x = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=False).clamp(0, 1) * 2 - 1
    g, d = nets()
    if channels_last:
        g, d, x = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last), \
            x.contiguous(memory_format=torch.channels_last)
    og, od = adams(g, d)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(x), BATCH):
        step(g, d, og, od, x[order[i : i + BATCH]])


def flops_per_image(step) -> float:
    g, d = nets()
    og, od = adams(g, d)
    x = torch.rand(BATCH, 1, SIZE, SIZE) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        step(g, d, og, od, x)
    return counter.get_total_flops() / BATCH


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=1280, help="training images per timed fit (20 batches of 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--anogan-images", type=int, default=32)
    p.add_argument("--anogan-steps", type=int, default=20)
    p.add_argument("--anogan-batches", type=int, nargs="+", default=[32, 128, 512],
                   help="search batch sizes to time (AnoGAN.score_batch_size)")
    p.add_argument("--only", choices=("ganomaly", "anogan"), default=None, help="run one of the two parts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, load average at start {os.getloadavg()}")
    mnist = load_mnist()
    images = mnist.images[mnist.classes != 0][: args.images].contiguous()
    if args.only != "anogan":
        ganomaly_part(images, args)
    if args.only != "ganomaly":
        anogan_part(images, args)
    print(f"load average at end {os.getloadavg()}")


def ganomaly_part(images, args) -> None:
    n = len(images)

    def ours():
        det = GANomaly(epochs=1, batch_size=BATCH)
        det.progress = False
        det.fit(images)

    runs = {"anomalab GANomaly.fit": ours,
            "plain, same step": lambda: plain_fit(images, same_step),
            "plain, official step": lambda: plain_fit(images, official_step),
            "plain, same step, channels_last": lambda: plain_fit(images, same_step, channels_last=True)}
    plain_fit(images[:BATCH * 2], same_step)  # warm-up (kernel selection, allocator)
    ours()
    times: dict[str, list[float]] = {k: [] for k in runs}
    items = list(runs.items())
    for r in range(args.repeats):  # alternate the order so that a load trend does not favour one variant
        for k, fn in items if r % 2 == 0 else items[::-1]:
            times[k].append(timed(fn))
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    flops = {"same step": flops_per_image(same_step), "official step": flops_per_image(official_step)}
    print(f"\nGANomaly training, {n} MNIST images, 28x28 -> 32x32, batch {BATCH}, nz {NZ}, ngf=ndf {WIDTH}, "
          f"median of {args.repeats}")
    print(f"FLOPs per image per step: same step {flops['same step'] / 1e9:.3f} GFLOP, official step "
          f"{flops['official step'] / 1e9:.3f} GFLOP")
    for k, r in rate.items():
        f = flops["official step"] if "official" in k else flops["same step"]
        print(f"  {k:34s} {r:7.1f} images/s   {r * f / 1e9:6.1f} GFLOP/s   (runs: "
              f"{', '.join(f'{t:.1f}' for t in times[k])} s)")
    ours_rate = rate["anomalab GANomaly.fit"]
    cl = rate["plain, same step, channels_last"]
    print(f"ratio fit / plain same step, channels_last (the same computation): {ours_rate / cl:.3f}  (target >= 0.9)")
    print(f"ratio fit / plain same step, default layout:  {ours_rate / rate['plain, same step']:.3f}")
    print(f"ratio fit / plain official step:              {ours_rate / rate['plain, official step']:.3f}")
    print(f"ratio channels_last / default layout (plain): {cl / rate['plain, same step']:.3f}")



def anogan_part(images, args) -> None:
    """AnoGAN: batched vs sequential latent search on the same queries, same initial z."""
    det = AnoGAN(epochs=1, batch_size=BATCH)
    det.progress = False
    det.fit(images[:256])
    g, d = det.generator_.eval(), det.discriminator_.eval()
    for q in [*g.parameters(), *d.parameters()]:
        q.requires_grad_(False)
    x = F.interpolate(images[: args.anogan_images], size=(SIZE, SIZE), mode="bilinear") * 2 - 1
    z0 = torch.randn(len(x), NZ, generator=torch.Generator().manual_seed(0))
    feats = lambda t: d(t)[1]  # noqa: E731
    gf, ff = fold_batchnorm(g), fold_batchnorm(d.features)  # what AnoGAN.search runs
    ways = {  # name -> one timed call over all queries
        "one query at a time": lambda: [latent_search(g, feats, x[i : i + 1], z0[i : i + 1], args.anogan_steps)
                                        for i in range(len(x))],
        "one query at a time, BatchNorm folded": lambda: [latent_search(gf, ff, x[i : i + 1], z0[i : i + 1],
                                                                        args.anogan_steps) for i in range(len(x))],
        "batched": lambda: latent_search(g, feats, x, z0, args.anogan_steps),
        "batched, BatchNorm folded (AnoGAN.search)": lambda: latent_search(gf, ff, x, z0, args.anogan_steps),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(args.repeats):
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            times[name].append(timed(ways[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    per = args.anogan_images * args.anogan_steps
    print(f"\nAnoGAN latent search, {args.anogan_images} queries x {args.anogan_steps} Adam steps (median of "
          f"{args.repeats}, interleaved):")
    for name, t in med.items():
        print(f"  {name:42s} {per / t:8.1f} image-steps/s  ({t:.2f} s)")
    base = med["one query at a time"]
    print(f"ratio batched / one at a time: {base / med['batched']:.1f}x; batched with BatchNorm folded / one at a "
          f"time: {base / med['batched, BatchNorm folded (AnoGAN.search)']:.1f}x; folding alone (batched): "
          f"{med['batched'] / med['batched, BatchNorm folded (AnoGAN.search)']:.2f}x, (one at a time): "
          f"{base / med['one query at a time, BatchNorm folded']:.2f}x")
    zz = z0[:1].clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fc:  # one image-step: G, D features of G(z), backward to z
        xh = gf(zz)
        ((xh - x[:1]).abs().sum() + (ff(xh) - ff(x[:1])).abs().sum()).backward(inputs=[zz])
    gflop = fc.get_total_flops() / 1e9
    best = per / med["batched, BatchNorm folded (AnoGAN.search)"]
    print(f"FLOPs per image-step {gflop:.3f} GFLOP: batched folded {best * gflop:.0f} GFLOP/s, one at a time "
          f"{per / base * gflop:.0f} GFLOP/s ({args.threads} thread(s))")
    # the search's batch size (AnoGAN.score_batch_size): many queries cut into batches of bs
    many = F.interpolate(images[: max(args.anogan_batches)], size=(SIZE, SIZE), mode="bilinear") * 2 - 1
    zm = torch.randn(len(many), NZ, generator=torch.Generator().manual_seed(0))
    steps = max(2, args.anogan_steps // 4)
    chunked = {bs: [] for bs in args.anogan_batches}
    for r in range(args.repeats):
        for bs in (args.anogan_batches if r % 2 == 0 else args.anogan_batches[::-1]):
            chunked[bs].append(timed(lambda bs=bs: [latent_search(gf, ff, many[i : i + bs], zm[i : i + bs], steps)
                                                    for i in range(0, len(many), bs)]))
    print(f"{len(many)} queries x {steps} steps cut into batches of: " + ", ".join(
        f"{bs}: {len(many) * steps / statistics.median(t):.0f} image-steps/s" for bs, t in chunked.items()))
    per_query = 500 / args.anogan_steps / args.anogan_images  # seconds per query at the paper's 500 steps
    print(f"at 500 steps one query costs {med['batched, BatchNorm folded (AnoGAN.search)'] * per_query:.2f} s "
          f"in AnoGAN.search, {base * per_query:.2f} s alone")


if __name__ == "__main__":
    main()
