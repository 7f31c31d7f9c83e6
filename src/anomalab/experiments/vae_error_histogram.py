"""Reconstruction error of training vs unseen digits, VAE z = 64 (docs/section1.md; the source's Fig. 7).

Source's claim: both have some error; in the high-error tail the share of unseen images grows.
Measured: unseen share among images above the 90th/95th/99th percentile of all errors, beside their
share overall (equal-size samples of training and unseen digits, so "no effect" = 0.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anomalab.experiments._common import conv28_model, conv28_parser, conv28_split, pyplot, save_figure, write_json

# ---- settings --------------------------------------------------------------------------------------
LATENT_DIM = 64  # the source's large-latent VAE
TAILS = (90, 95, 99)  # percentiles of all errors above which the unseen share is measured


# ---- run -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = conv28_parser("vae_error_histogram", __doc__).parse_args(argv)
    train, unseen = conv28_split(args.mnist_root, args.seed)
    det = conv28_model("vae", LATENT_DIM, train, args)
    rng = np.random.default_rng(args.seed)
    seen_idx = rng.choice(len(train), size=len(unseen), replace=False)
    e_train = det.score(train.images[seen_idx]).numpy()
    e_unseen = det.score(unseen.images).numpy()
    both = np.concatenate([e_train, e_unseen])
    is_unseen = np.r_[np.zeros(len(e_train)), np.ones(len(e_unseen))]
    results = {"n_each": len(e_unseen), "epochs": args.epochs, "seed": args.seed,
               "mean_error_train": float(e_train.mean()), "mean_error_unseen": float(e_unseen.mean()),
               "unseen_share_overall": float(is_unseen.mean())}
    for q in TAILS:
        tail = both >= np.percentile(both, q)
        results[f"unseen_share_above_p{q}"] = float(is_unseen[tail].mean())
    out = args.out
    histogram_figure(e_train, e_unseen, out / "error_histogram.png")
    write_json(out, results)
    print(f"mean error: training {results['mean_error_train']:.4f}, unseen {results['mean_error_unseen']:.4f}")
    for q in TAILS:
        print(f"share of unseen digits above the {q}th percentile: {results[f'unseen_share_above_p{q}']:.2f} "
              f"(overall {results['unseen_share_overall']:.2f})")
    print(f"figure: {out / 'error_histogram.png'}")
    return results


# ---- figures ---------------------------------------------------------------------------------------
def histogram_figure(e_train: np.ndarray, e_unseen: np.ndarray, path: Path) -> Path:
    """a) both error histograms; b) the same above the 90th percentile of all errors."""
    both = np.concatenate([e_train, e_unseen])
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    edges = np.histogram_bin_edges(both, bins=50)
    for ax, title in zip(axes, ("a) training vs unseen digits", "b) the high-error tail")):
        ax.hist(e_train, bins=edges, alpha=0.6, label="training digits")
        ax.hist(e_unseen, bins=edges, alpha=0.6, label="unseen digits")
        ax.set_xlabel("reconstruction error (MSE)")
        ax.set_ylabel("images")
        ax.set_title(title, fontsize=9)
    lo = np.percentile(both, 90)
    axes[1].set_xlim(lo, both.max())
    axes[1].set_ylim(0, max(1, np.histogram(both[both >= lo], bins=edges)[0].max() + 2))
    axes[0].legend(frameon=False)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
