"""Reconstruction error of training vs unseen digits, VAE z = 64 (METHODS.md section 1, Fig. 7).

Source's claim: both have some error; in the high-error tail the share of unseen images grows.
Measured: unseen share among images above the 90th/95th/99th percentile of all errors, beside their
share overall (equal-size samples of training and unseen digits, so "no effect" = 0.5).
"""

from __future__ import annotations

import numpy as np

from anomalab.experiments import _section1 as s1
from anomalab.report.plots import _save, plt


def main(argv: list[str] | None = None) -> dict:
    args = s1.parser(__doc__.splitlines()[0], "vae_error_histogram").parse_args(argv)
    train, unseen = s1.split(args.mnist_root, args.seed)
    det = s1.model("vae", 64, train, args)
    rng = np.random.default_rng(args.seed)
    seen_idx = rng.choice(len(train), size=len(unseen), replace=False)
    e_train = det.score(train.images[seen_idx]).numpy()
    e_unseen = det.score(unseen.images).numpy()
    both = np.concatenate([e_train, e_unseen])
    is_unseen = np.r_[np.zeros(len(e_train)), np.ones(len(e_unseen))]
    results = {"n_each": len(e_unseen), "epochs": args.epochs, "seed": args.seed,
               "mean_error_train": float(e_train.mean()), "mean_error_unseen": float(e_unseen.mean()),
               "unseen_share_overall": float(is_unseen.mean())}
    for q in (90, 95, 99):
        tail = both >= np.percentile(both, q)
        results[f"unseen_share_above_p{q}"] = float(is_unseen[tail].mean())
    out = s1.Path(args.out)
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
    _save(fig, out / "error_histogram.png")
    s1.write_results(out, results)
    print(f"mean error: training {results['mean_error_train']:.4f}, unseen {results['mean_error_unseen']:.4f}")
    for q in (90, 95, 99):
        print(f"share of unseen digits above the {q}th percentile: {results[f'unseen_share_above_p{q}']:.2f} "
              f"(overall {results['unseen_share_overall']:.2f})")
    print(f"figure: {out / 'error_histogram.png'}")
    return results


if __name__ == "__main__":
    main()
