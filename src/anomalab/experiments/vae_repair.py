"""Repair ability: a VAE with z = 64 "repairs" local defects of unseen digits (docs/section1.md).

Local defects (a smudge blob and a stray stroke) are drawn on unseen digits; the grid shows clean input,
defective input, reconstruction and |input - reconstruction|. Measured: inside the defect mask, the
reconstruction's distance to the clean digit over the defective input's distance to it (`repair_ratio`,
< 1 = the defect was removed toward the typical digit), the same distance when the clean digit is the
input (the floor set by the VAE's blur), and the distance outside the mask.
"""

from __future__ import annotations

import numpy as np
import torch

from anomalab.experiments._common import conv28_model, conv28_parser, conv28_split, write_json
from anomalab.report.plots import image_grid

# ---- settings --------------------------------------------------------------------------------------
LATENT_DIM = 64  # the source's large-latent VAE
N_SHOW = 10  # digits in the grids (one per class)


# ---- run -------------------------------------------------------------------------------------------

def add_local_defects(images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smudge (filled disc, radius 2-3 px) or a stray stroke (a 1-px line of 6-10 px) per digit."""
    rng = np.random.default_rng(seed)
    out, masks = images.clone(), torch.zeros(len(images), 28, 28)
    yy, xx = np.mgrid[:28, :28]
    for i in range(len(images)):
        if i % 2 == 0:
            cy, cx, r = rng.integers(6, 22), rng.integers(6, 22), rng.uniform(2, 3.2)
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            y0, x0 = rng.integers(3, 25, size=2)
            angle, length = rng.uniform(0, np.pi), rng.integers(6, 11)
            t = np.linspace(0, length, 4 * length)
            ys = np.clip(np.round(y0 + t * np.sin(angle)), 0, 27).astype(int)
            xs = np.clip(np.round(x0 + t * np.cos(angle)), 0, 27).astype(int)
            m = np.zeros((28, 28), bool)
            m[ys, xs] = True
        m = torch.from_numpy(m)
        masks[i] = m.float()
        out[i, 0][m] = 1.0
    return out, masks


def main(argv: list[str] | None = None) -> dict:
    args = conv28_parser("vae_repair", __doc__).parse_args(argv)
    train, unseen = conv28_split(args.mnist_root, args.seed)
    det = conv28_model("vae", LATENT_DIM, train, args)
    clean = unseen.images
    broken, masks = add_local_defects(clean, args.seed)
    recon = det.reconstruct(broken)
    m = masks[:, None].bool()
    changed = m & (broken != clean)
    inside_before = (broken - clean).abs()[changed].mean().item()
    inside_after = (recon - clean).abs()[changed].mean().item()
    outside_after = (recon - clean).abs()[~m].mean().item()
    # the same pixels when the clean digit goes in: the floor set by the VAE's own blur
    floor = (det.reconstruct(clean) - clean).abs()[changed].mean().item()
    results = {"n_unseen": len(unseen), "epochs": args.epochs, "seed": args.seed,
               "defect_error_before": inside_before, "defect_error_after": inside_after,
               "repair_ratio": inside_after / inside_before, "error_outside_defect": outside_after,
               "defect_pixels_error_for_clean_input": floor}
    out = args.out
    digits = unseen.classes.numpy()
    # one per digit, alternating the two defect kinds (even index: smudge, odd: stroke)
    idx = [int(np.flatnonzero(digits == d)[d % 2]) for d in np.unique(digits)][:N_SHOW]
    image_grid([("clean", clean[idx]), ("with defect", broken[idx]), ("VAE z=64 output", recon[idx]),
                ("|input - output|", (broken[idx] - recon[idx]).abs().mean(1))],
               out / "repair_grid.png", title="VAE (z=64) repairs local defects of unseen digits",
               map_rows=("|input - output|",))
    natural = det.reconstruct(clean[idx])
    image_grid([("unseen input", clean[idx]), ("VAE z=64 output", natural)], out / "repair_natural.png",
               title="unseen digits and their z=64 reconstructions")
    write_json(out, results)
    print(f"defect pixels: |input - clean| {inside_before:.3f} -> |output - clean| {inside_after:.3f} "
          f"(repair ratio {results['repair_ratio']:.3f}; {floor:.3f} when the clean digit goes in); "
          f"outside defects |output - clean| {outside_after:.3f}")
    print(f"figures: {out / 'repair_grid.png'}, {out / 'repair_natural.png'}")
    return results


if __name__ == "__main__":
    main()
