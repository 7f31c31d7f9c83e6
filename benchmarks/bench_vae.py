"""VAE throughput: anomalab's `fit`/`score` against a minimal plain PyTorch loop over the same network,
measured in the same run (interleaved repeats, best of each), printed as images/s and ratios.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_vae.py [--epochs 3] [--repeats 3] [--threads 2]

Target: toolkit / plain >= 0.9 for training and scoring. One-image-at-a-time scoring is shown for scale.
"""

from __future__ import annotations

import argparse

from _common import timed  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads

# isort: split
import torch  # noqa: E402

import anomalab  # noqa: E402
from anomalab.data.mnist import load_mnist  # noqa: E402
from anomalab.detectors.vae import vae_loss  # noqa: E402
from anomalab.nets.conv28 import Decoder28, Encoder28  # noqa: E402

LATENT, BATCH, LR = 64, 128, 1e-3


def plain_fit(x: torch.Tensor, epochs: int) -> None:
    torch.manual_seed(0)
    enc, dec = Encoder28(1, LATENT, variational=True), Decoder28(1, LATENT)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=LR)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(BATCH):
            batch = x[idx]
            q = enc.posterior(batch)
            loss = vae_loss(batch, dec(q.rsample()), q)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()


def plain_score(enc, dec, x: torch.Tensor, batch: int) -> torch.Tensor:
    enc.eval()
    dec.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            b = x[i : i + batch]
            out.append((b - dec(enc(b)[0])).pow(2).flatten(1).mean(1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = load_mnist().images[:4000].contiguous()
    n_train = len(x) * args.epochs
    # untimed warm-up of both paths (thread pool start, first allocations), then interleaved timed repeats
    warm = anomalab.create("vae", latent_dim=LATENT, epochs=1, batch_size=BATCH, lr=LR)
    warm.progress = False
    warm.fit(x[:512])
    plain_fit(x[:512], 1)
    toolkit_fit, plain_fit_s = [], []
    det = None
    for _ in range(args.repeats):
        det = anomalab.create("vae", latent_dim=LATENT, epochs=args.epochs, batch_size=BATCH, lr=LR)
        det.progress = False
        toolkit_fit.append(timed(lambda d=det: d.fit(x)))
        plain_fit_s.append(timed(lambda: plain_fit(x, args.epochs)))
    enc, dec = det.encoder_, det.decoder_
    toolkit_score, plain_score_s = [], []
    for _ in range(args.repeats):
        toolkit_score.append(timed(lambda: det.score(x)))
        plain_score_s.append(timed(lambda: plain_score(enc, dec, x, det.score_batch_size)))
    onnx_rate = None
    try:
        import tempfile

        from anomalab.export import OnnxScorer, export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            scorer = OnnxScorer(export_onnx(det, f"{tmp}/vae.onnx"), threads=args.threads)
            onnx_rate = len(x) / min(timed(lambda: scorer.score(x)) for _ in range(args.repeats))
    except ImportError:
        pass
    one_at_a_time = timed(lambda: [det.score(x[i : i + 1]) for i in range(500)]) / 500 * len(x)
    assert torch.allclose(det.score(x), plain_score(enc, dec, x, 256), atol=1e-6)

    def rate(n, times):
        return n / min(times)

    rows = [
        (f"train (fit, {args.epochs} epochs)", rate(n_train, toolkit_fit), rate(n_train, plain_fit_s)),
        ("score (batched)", rate(len(x), toolkit_score), rate(len(x), plain_score_s)),
    ]
    print(f"VAE z={LATENT}, 28x28, batch {BATCH}, {args.threads} threads, best of {args.repeats} interleaved runs")
    print(f"{'':24s}{'anomalab img/s':>16s}{'plain torch img/s':>20s}{'ratio':>8s}")
    for name, ours, plain in rows:
        print(f"{name:24s}{ours:16.0f}{plain:20.0f}{ours / plain:8.2f}")
    if onnx_rate is not None:
        print(f"{'score (ONNX Runtime)':24s}{onnx_rate:16.0f}{'':20s}"
              f"{onnx_rate / rows[1][1]:8.2f}  (vs batched anomalab)")
    print(f"{'score one at a time':24s}{len(x) / one_at_a_time:16.0f}{'':20s}"
          f"{(len(x) / one_at_a_time) / rows[1][1]:8.2f}  (vs batched anomalab)")


if __name__ == "__main__":
    main()
