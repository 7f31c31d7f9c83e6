"""Classical baselines (raw-pixel kNN, PCA) on the one-class MNIST protocol, all ten digits.

GANomaly-paper protocol: digit d is the anomaly; 80 % of the other nine digits train, the remaining 20 %
plus every image of digit d test. results.md: image AUROC mean ± std over seeds per digit, beside
reference figures measured on the same protocol (raw-pixel kNN with scikit-learn: 0.973 / 0.494 / 0.900
for digits 0 / 1 / 8; anomalib 2.7.0 GANomaly: 0.848 / 0.377 / 0.753). Cells (detector x digit x seed)
are appended to results.jsonl as they finish; a rerun skips them.

    anomalab experiment baselines_mnist [--digits 0 1 8] [--seeds 0 1 2]
"""

from __future__ import annotations

import numpy as np

from anomalab.experiments._common import markdown_table, mean_std, open_store, parser, write_table

# ---- settings --------------------------------------------------------------------------------------
DETECTORS = {"knn": {"k": 5}, "pca": {"n_components": 32}}  # name -> parameters
DIGITS = tuple(range(10))  # anomaly digits
SEEDS = (0, 1, 2)  # shuffles of the normal digits before the 80 / 20 split
KEY = ("detector", "digit", "seed")  # what identifies a row of results.jsonl
REFERENCE = {"knn (scikit-learn, reference)": {0: 0.973, 1: 0.494, 8: 0.900},
             "GANomaly (anomalib 2.7.0; digit 0 after 15 epochs, 1 and 8 after 1)": {0: 0.848, 1: 0.377, 8: 0.753}}


# ---- run -------------------------------------------------------------------------------------------
def run_cell(name: str, train, test) -> dict:
    from anomalab.evaluation import evaluate
    from anomalab.registry import create

    return evaluate(create(name, **DETECTORS[name]).fit(train), test).metrics


def main(argv: list[str] | None = None) -> dict:
    p = parser("baselines_mnist", __doc__)
    p.add_argument("--digits", type=int, nargs="+", default=list(DIGITS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--mnist-root", default=None, help="folder with the MNIST IDX files (default: 5,000 digits)")
    args = p.parse_args(argv)
    from anomalab.data.mnist import load_mnist
    from anomalab.data.splits import one_class_split

    store = open_store(args.out, KEY)
    ds = load_mnist(args.mnist_root)
    for digit in args.digits:
        for seed in args.seeds:
            todo = [name for name in DETECTORS if (name, digit, seed) not in store]
            if todo:
                train, test = one_class_split(ds, digit, seed=seed)
            for name in todo:
                store.add({"detector": name, "digit": digit, "seed": seed, **run_cell(name, train, test)})
    rows = [r for r in store if r["digit"] in args.digits and r["seed"] in args.seeds]
    table = write_table(args.out, table_lines(rows, args.digits, args.seeds, len(ds)))
    print(table)
    return {"results": rows}


# ---- table -----------------------------------------------------------------------------------------
def table_lines(rows: list[dict], digits: list[int], seeds: list[int], n_images: int) -> list[str]:
    body = []
    for name in DETECTORS:
        per_digit = [[r["image_auroc"] for r in rows if r["detector"] == name and r["digit"] == d] for d in digits]
        body.append([name, *map(mean_std, per_digit), f"{np.mean([np.mean(a) for a in per_digit]):.3f}"])
    for ref, values in REFERENCE.items():
        body.append([ref, *(f"{values[d]:.3f}" if d in values else "" for d in digits), ""])
    return [f"Image AUROC, mean ± std over seeds {seeds}, {n_images} digits (`anomalab experiment "
            "baselines_mnist`)", "", *markdown_table(["detector", *map(str, digits), "mean"], body)]


if __name__ == "__main__":
    main()
