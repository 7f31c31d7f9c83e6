"""GAN detectors' BatchNorm statistics at 1, 5 and 15 epochs on MNIST digits 0, 1 and 8: the running
averages of training against the statistics re-estimated on the training images (the default).

Each detector (GANomaly, Skip-GANomaly, EGBAD, AnoGAN at their paper settings except the epoch count) is
trained once per anomaly digit on the GANomaly protocol split (80 % of the other nine digits, seed 0) and
scored after epochs 1, 5 and 15. Training is seeded per epoch (`train_more`), so the model after epoch 5
is the model `epochs=5` trains. At each of those points a copy of the model is scored three ways:
- `running averages`: the BatchNorm statistics training left (momentum 0.1), `bn_recalibrate=false`;
- `re-estimated` (the default, `bn_recalibrate=true`): one pass over the training images with the final
  weights, cumulative averages (`GANDetector.recalibrate_bn`); training images only, an honest evaluation;
- `test batches` (GANomaly and Skip-GANomaly only): the official GANomaly code's test mode, every BatchNorm
  normalising with the statistics of the test batch (64 images, test set in its label-sorted order). It
  uses the test set's labels through the batch composition: shown for comparison, not a valid result.
AnoGAN scores a stratified 300-image subset of the test set with 100 latent steps (its paper: 500 steps
on every image, hours here). Rows are appended to results.jsonl per (detector, digit), so a cut run
resumes; results.md and the figure are rebuilt from it.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from anomalab.data.mnist import load_mnist
from anomalab.data.splits import one_class_split
from anomalab.data.transforms import prepare
from anomalab.experiments._common import markdown_table, open_store, parser, pyplot, report_table, save_figure
from anomalab.experiments.gan_mnist import REFERENCE, batch_statistics, stratified
from anomalab.metrics import image_auroc
from anomalab.registry import create

log = logging.getLogger(__name__)

# ---- settings --------------------------------------------------------------------------------------
DETECTORS = ("ganomaly", "skip_ganomaly", "egbad", "anogan")  # every BatchNorm-using GAN detector
DIGITS = (0, 1, 8)  # anomaly digits (the ones with anomalib figures on this protocol)
MILESTONES = (1, 5, 15)  # epochs after which the model is scored
SEED = 0  # split shuffle and detector seed
TREATMENTS = ("running averages", "re-estimated", "test batches")
TEST_BATCHES = ("ganomaly", "skip_ganomaly")  # the official test mode is GANomaly's code's
SCORE_BATCH = 64  # the official code's test batch size (test-batch statistics depend on it)
ANOGAN = {"n_steps": 100, "test_limit": 300}  # AnoGAN's reduced scoring (see the docstring)
KEY = ("detector", "digit", "seed")


# ---- run -------------------------------------------------------------------------------------------
def parse(argv):
    p = parser("gan_bn_defaults", __doc__)
    p.add_argument("--digits", type=int, nargs="+", default=list(DIGITS))
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    p.add_argument("--milestones", type=int, nargs="+", default=list(MILESTONES),
                   help="epochs after which to score (increasing)")
    p.add_argument("--train-limit", type=int, default=None, help="train on a random subset of this many images")
    p.add_argument("--mnist-root", default=None, help="folder with the MNIST IDX files (default: 5,000 digits)")
    p.add_argument("--report-only", action="store_true", help="rebuild table and figure from results.jsonl")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if sorted(set(args.milestones)) != args.milestones or args.milestones[0] < 1:
        p.error("--milestones must be increasing positive epoch counts, e.g. 1 5 15")
    return args


def _aurocs(det, name: str, train_x: torch.Tensor, test) -> dict[str, float]:
    """AUROC of a copy of `det` under each BatchNorm treatment (the copy is recalibrated, not `det`)."""
    labels = test.labels.numpy()
    out = {"running averages": image_auroc(labels, det.score(test.images, batch_size=SCORE_BATCH).numpy())}
    if name in TEST_BATCHES:
        with ExitStack() as stack:  # every net; label-sorted order: normals first, as the official loader
            for net in det._nets().values():
                stack.enter_context(batch_statistics(net))
            out["test batches"] = image_auroc(labels, det.score(test.images, batch_size=SCORE_BATCH).numpy())
    twin = copy.deepcopy(det)
    twin.recalibrate_bn(train_x * 2 - 1)  # it takes images in [-1, 1]
    out["re-estimated"] = image_auroc(labels, twin.score(test.images, batch_size=SCORE_BATCH).numpy())
    return out


def run_cell(name: str, digit: int, data, args) -> dict:
    train, test = one_class_split(data, digit, train_frac=0.8, seed=SEED)
    if args.train_limit:
        rng = np.random.default_rng(SEED)
        train = train.subset(np.sort(rng.choice(len(train), args.train_limit, replace=False)))
    params = {"seed": SEED, "bn_recalibrate": False, "epochs": args.milestones[0]}
    if name == "anogan":
        params["n_steps"] = ANOGAN["n_steps"]
        test = stratified(test, ANOGAN["test_limit"], seed=0)
    det = create(name, **params)
    det.progress = False
    t0 = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - t0  # training only: the scoring at each milestone is not counted
    x = prepare(train.images, det.input_shape_)
    points, done = [], args.milestones[0]
    for epochs in args.milestones:
        if epochs > done:
            t0 = time.perf_counter()
            det.train_more(x, epochs=epochs - done)
            fit_s += time.perf_counter() - t0
            done = epochs
        aurocs = _aurocs(det, name, x, test)
        points.append({"epochs": epochs, "fit_s": fit_s, "auroc": aurocs})
        print(f"{name:14s} digit {digit} epoch {epochs:3d}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items()) + f"  ({fit_s:.0f} s)", flush=True)
    return {"points": points, "n_train": len(train), "n_test": len(test),
            "scoring": ANOGAN if name == "anogan" else "full test set"}


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    store = open_store(args.out, KEY)
    if not args.report_only:
        data = load_mnist(args.mnist_root)
        for name in args.detectors:
            for digit in args.digits:
                if (name, digit, SEED) in store:
                    continue
                row = run_cell(name, digit, data, args)
                row.update(detector=name, digit=digit, seed=SEED, milestones=list(args.milestones),
                           train_limit=args.train_limit, threads=args.threads)
                store.add(row)
    return report(store, args.out)


# ---- table and figure ------------------------------------------------------------------------------
def table_lines(rows: list[dict]) -> list[str]:
    rows = sorted(rows, key=lambda r: (DETECTORS.index(r["detector"]), r["digit"]))
    milestones = sorted({p["epochs"] for r in rows for p in r["points"]})
    body = []
    for r in rows:
        at = {p["epochs"]: p["auroc"] for p in r["points"]}
        for t in TREATMENTS:
            if any(t in a for a in at.values()):
                body.append([r["detector"], r["digit"], t + (" (default)" if t == "re-estimated" else "")
                             + (" (uses test labels)" if t == "test batches" else ""),
                             *(f"{at[e][t]:.3f}" if e in at and t in at[e] else "-" for e in milestones)])
    refs = [[name, ", ".join(f"digit {d}: {v:.3f}" for d, v in vals.items())] for name, vals in REFERENCE.items()]
    fit = [[r["detector"], r["digit"], *(f"{p['fit_s']:.0f}" for p in r["points"]), r["n_test"]] for r in rows]
    return ["# GAN detectors: BatchNorm statistics at 1, 5 and 15 epochs (image AUROC, MNIST one-class)", "",
            "Seed 0, GANomaly protocol split; one model per detector and digit, scored after each epoch count "
            "under each BatchNorm treatment (see the experiment's docstring). AnoGAN: 300 stratified test "
            "images, 100 latent steps.", "",
            *markdown_table(["detector", "anomaly digit", "BatchNorm statistics", *(f"{e} ep" for e in milestones)],
                            body),
            "", "References on the same protocol and digits (not run here):", "",
            *markdown_table(["reference", "image AUROC"], refs),
            "", "Cumulative training seconds at each epoch count (one torch thread, shared machine):", "",
            *markdown_table(["detector", "digit", *(f"{e} ep" for e in milestones), "test images"], fit)]


def curves(rows: list[dict], path: Path) -> Path:
    """AUROC against epochs, one panel per detector, one line per digit: running averages dashed,
    re-estimated solid, test batches dotted."""
    names = [d for d in DETECTORS if any(r["detector"] == d for r in rows)]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0), squeeze=False, sharey=True)
    styles = {"running averages": "--", "re-estimated": "-", "test batches": ":"}
    for ax, name in zip(axes[0], names):
        for i, r in enumerate(sorted((r for r in rows if r["detector"] == name), key=lambda r: r["digit"])):
            e = [p["epochs"] for p in r["points"]]
            for t, style in styles.items():
                if t in r["points"][0]["auroc"]:
                    ax.plot(e, [p["auroc"][t] for p in r["points"]], style, marker="o", ms=3, color=f"C{i}",
                            label=f"digit {r['digit']}, {t}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epochs")
        ax.set_xscale("log")
        ax.set_xticks([1, 5, 15], ["1", "5", "15"])
        ax.axhline(0.5, color="grey", lw=0.5)
    axes[0][0].set_ylabel("image AUROC")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.suptitle("BatchNorm statistics: running averages (dashed), re-estimated on training images (solid, "
                 "default), test batches (dotted, uses test labels)", fontsize=8, y=1.03)
    return save_figure(fig, path)


def report(store, out: Path) -> dict:
    rows = report_table(store, out, table_lines)
    curves(rows, out / "bn_defaults.png")
    return {"rows": len(rows), "table": str(out / "results.md")}


if __name__ == "__main__":
    main()
