"""Latent clustering of unseen digits: AE vs VAE at z = 2 (2-D) and z = 3 (3-D) (METHODS.md section 1).

Source's claim: AE clusters differ in size with large empty gaps between them; VAE clusters are tighter,
similar in size, and fill the gaps. Measured on standardised latents: `size_cv` = coefficient of
variation of per-digit cluster spread (lower = more similar sizes) and `gap_ratio` = mean distance from
uniform points of the codes' central box (1st-99th percentile) to the nearest code, over the codes' own
nearest-neighbour distance (higher = more empty space between clusters).
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from anomalab.experiments import _section1 as s1
from anomalab.report.plots import _save, plt


def cluster_stats(z: np.ndarray, digits: np.ndarray, seed: int = 0) -> dict[str, float]:
    z = (z - z.mean(0)) / z.std(0).clip(1e-8)
    spread = np.array([np.linalg.norm(z[digits == d] - z[digits == d].mean(0), axis=1).mean() for d in range(10)])
    rng = np.random.default_rng(seed)
    # probes fill the central box (1st-99th percentile per axis), so a few outliers do not count as gaps
    probes = rng.uniform(np.percentile(z, 1, axis=0), np.percentile(z, 99, axis=0), size=(4000, z.shape[1]))
    nn = NearestNeighbors(n_neighbors=2).fit(z)
    own = nn.kneighbors(z)[0][:, 1].mean()
    empty = nn.kneighbors(probes, n_neighbors=1)[0].mean()
    return {"size_cv": float(spread.std() / spread.mean()), "gap_ratio": float(empty / own),
            "mean_spread": float(spread.mean())}


def main(argv: list[str] | None = None) -> dict:
    args = s1.parser(__doc__.splitlines()[0], "latent_scatter").parse_args(argv)
    train, unseen = s1.split(args.mnist_root, args.seed)
    digits = unseen.classes.numpy()
    out = s1.Path(args.out)
    results = {"n_train": len(train), "n_unseen": len(unseen), "epochs": args.epochs, "seed": args.seed}
    codes = {}
    for kind in ("conv_ae", "vae"):
        for z in (2, 3):
            codes[kind, z] = s1.model(kind, z, train, args).embed(unseen.images).numpy()
            results[f"{kind}_z{z}"] = cluster_stats(codes[kind, z], digits, args.seed)
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, kind in zip(axes, ("conv_ae", "vae")):
        c = codes[kind, 2]
        for d in range(10):
            ax.scatter(*c[digits == d].T, s=4, color=cmap(d), label=str(d))
        st = results[f"{kind}_z2"]
        ax.set_title(f"{kind}, z=2: size CV {st['size_cv']:.2f}, gap ratio {st['gap_ratio']:.1f}", fontsize=9)
    axes[1].legend(markerscale=3, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    _save(fig, out / "latent_2d.png")
    fig = plt.figure(figsize=(10, 4.8))
    for i, kind in enumerate(("conv_ae", "vae")):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        c = codes[kind, 3]
        for d in range(10):
            ax.scatter(*c[digits == d].T, s=3, color=cmap(d), label=str(d))
        st = results[f"{kind}_z3"]
        ax.set_title(f"{kind}, z=3: size CV {st['size_cv']:.2f}, gap ratio {st['gap_ratio']:.1f}", fontsize=9)
    _save(fig, out / "latent_3d.png")
    s1.write_results(out, results)
    for key in ("conv_ae_z2", "vae_z2", "conv_ae_z3", "vae_z3"):
        r = results[key]
        print(f"{key:11s} size CV {r['size_cv']:.3f}  gap ratio {r['gap_ratio']:.2f}")
    print(f"figures: {out / 'latent_2d.png'}, {out / 'latent_3d.png'}")
    return results


if __name__ == "__main__":
    main()
