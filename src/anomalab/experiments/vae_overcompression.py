"""Over-compression at z = 3: blurry, over-typical reconstructions and misrecognised digits, against z = 64
(docs/section1.md; the source's Fig. 8).

A digit classifier (logistic regression on pixels, trained on the real training digits) reads the
reconstructions of unseen digits: `misrecognised` = share whose reconstruction is classified as another
digit than the input's label, among inputs the classifier reads correctly. Blur: mean gradient magnitude
of reconstructions over that of the inputs (1 = as sharp). Typicality: mean distance of the
reconstruction to its digit's mean training image over the input's.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from anomalab.experiments._common import conv28_model, conv28_parser, conv28_split, write_json
from anomalab.report.plots import image_grid

# ---- settings --------------------------------------------------------------------------------------
LATENT_DIMS = (3, 64)  # the over-compressed VAE and the source's large-latent one
CLASSIFIER_C = 0.1  # inverse L2 strength of the pixel logistic regression that reads the digits
N_SHOW = 12  # columns of the grid (up to 6 of them misrecognised)


# ---- run -------------------------------------------------------------------------------------------
def sharpness(x: torch.Tensor) -> float:
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return float(gx + gy)


def main(argv: list[str] | None = None) -> dict:
    args = conv28_parser("vae_overcompression", __doc__).parse_args(argv)
    train, unseen = conv28_split(args.mnist_root, args.seed)
    y_train, y = train.classes.numpy(), unseen.classes.numpy()
    clf = LogisticRegression(max_iter=500, C=CLASSIFIER_C).fit(train.images.flatten(1).numpy(), y_train)
    pred_in = clf.predict(unseen.images.flatten(1).numpy())
    ok = pred_in == y
    means = torch.stack([train.images[train.classes == d].mean(0) for d in range(10)])
    results = {"n_unseen": len(unseen), "epochs": args.epochs, "seed": args.seed,
               "classifier_accuracy_on_inputs": float(ok.mean())}
    recons = {}
    for z in LATENT_DIMS:
        det = conv28_model("vae", z, train, args)
        recon = det.reconstruct(unseen.images)
        recons[z] = recon
        pred = clf.predict(recon.flatten(1).numpy())
        typ_in = (unseen.images - means[y]).flatten(1).norm(dim=1).mean()
        typ_out = (recon - means[y]).flatten(1).norm(dim=1).mean()
        results[f"z{z}"] = {
            "misrecognised": float((pred[ok] != y[ok]).mean()),
            "classifier_accuracy_on_reconstructions": float((pred == y).mean()),
            "sharpness_ratio": sharpness(recon) / sharpness(unseen.images),
            "typicality_ratio": float(typ_out / typ_in),
        }
    out = args.out
    pred3 = clf.predict(recons[3].flatten(1).numpy())
    # one example per digit: first those the z=3 output keeps, then those it turns into another digit
    wrong = [int(i[0]) for d in range(10) if len(i := np.flatnonzero(ok & (pred3 != y) & (y == d)))][: N_SHOW // 2]
    right = [int(i[0]) for d in range(10) if len(i := np.flatnonzero(ok & (pred3 == y) & (y == d)))]
    right = right[: N_SHOW - len(wrong)]
    idx = right + wrong
    titles = [f"{y[i]}->{pred3[i]}" for i in idx]
    image_grid([("unseen input", unseen.images[idx]), ("z=64 output", recons[64][idx]),
                ("z=3 output", recons[3][idx])], out / "overcompression_grid.png", col_titles=titles,
               title="z=3 reconstructions are blurred and typical; right-hand columns are misrecognised "
                     "(label->digit read from the z=3 output)")
    write_json(out, results)
    print(f"classifier accuracy on unseen inputs: {results['classifier_accuracy_on_inputs']:.3f}")
    for z in LATENT_DIMS:
        r = results[f"z{z}"]
        print(f"z={z:2d}: misrecognised {100 * r['misrecognised']:.1f} %, sharpness ratio {r['sharpness_ratio']:.2f}, "
              f"typicality ratio {r['typicality_ratio']:.2f}")
    print(f"figure: {out / 'overcompression_grid.png'}")
    return results


if __name__ == "__main__":
    main()
