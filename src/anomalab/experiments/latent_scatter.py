"""Latent clustering of unseen digits: AE vs VAE at z = 2 (2-D) and z = 3 (3-D) (docs/section1.md).

Source's claim: AE clusters differ in size with large empty gaps between them; VAE clusters are tighter,
similar in size, and fill the gaps. Measured on standardised latents: `size_cv` = coefficient of
variation of per-digit cluster spread (lower = more similar sizes) and `gap_ratio` = mean distance from
uniform points of the codes' central box (1st-99th percentile) to the nearest code, over the codes' own
nearest-neighbour distance (higher = more empty space between clusters).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors

from anomalab.experiments._common import conv28_model, conv28_parser, conv28_split, pyplot, save_figure, write_json

# ---- settings --------------------------------------------------------------------------------------
KINDS = ("conv_ae", "vae")  # the conv28 AE and VAE
LATENT_DIMS = (2, 3)  # the source's two plotted latent sizes


# ---- run -------------------------------------------------------------------------------------------
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
    args = conv28_parser("latent_scatter", __doc__).parse_args(argv)
    train, unseen = conv28_split(args.mnist_root, args.seed)
    digits = unseen.classes.numpy()
    results = {"n_train": len(train), "n_unseen": len(unseen), "epochs": args.epochs, "seed": args.seed}
    codes = {}
    for kind in KINDS:
        for z in LATENT_DIMS:
            codes[kind, z] = conv28_model(kind, z, train, args).embed(unseen.images).numpy()
            results[f"{kind}_z{z}"] = cluster_stats(codes[kind, z], digits, args.seed)
    write_json(args.out, results)
    for key in ("conv_ae_z2", "vae_z2", "conv_ae_z3", "vae_z3"):
        r = results[key]
        print(f"{key:11s} size CV {r['size_cv']:.3f}  gap ratio {r['gap_ratio']:.2f}")
    for z in LATENT_DIMS:
        print(f"figure: {scatter_figure(codes, digits, results, z, args.out / f'latent_{z}d.png')}")
    return results


# ---- figures ---------------------------------------------------------------------------------------
def scatter_figure(codes: dict, digits: np.ndarray, results: dict, z: int, path: Path) -> Path:
    """The unseen digits' codes, AE beside VAE, coloured by digit (z = 2: plane, z = 3: 3-D)."""
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    fig = plt.figure(figsize=(10, 4.6 if z == 2 else 4.8))
    for i, kind in enumerate(KINDS):
        ax = fig.add_subplot(1, 2, i + 1, **({"projection": "3d"} if z == 3 else {}))
        for d in range(10):
            ax.scatter(*codes[kind, z][digits == d].T, s=4 if z == 2 else 3, color=cmap(d), label=str(d))
        st = results[f"{kind}_z{z}"]
        ax.set_title(f"{kind}, z={z}: size CV {st['size_cv']:.2f}, gap ratio {st['gap_ratio']:.1f}", fontsize=9)
    if z == 2:
        ax.legend(markerscale=3, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
