"""Gaussian AD on pretrained features (Rippel et al. 2020) on the scikit-image textures.

Per category: image AUROC of the sum over all nine levels and of every level alone (the paper's level
study), and pixel AUROC / AUPRO of the patch variant's maps (plus the image AUROC of the map maximum).
Reference: the paper's EfficientNet-B4 on MVTec AD (15 categories): mean image AUROC 94.8, level 7 alone
96.7. Ours is EfficientNet-Lite0 on three synthetic-defect textures, so only the shape is comparable.
One row per category and image size in results.jsonl; a rerun skips them.

    anomalab experiment gaussian_textures [--image-size 224] [--categories brick grass gravel]
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from anomalab.data.folder import load_mvtec
from anomalab.data.textures import CATEGORIES
from anomalab.experiments._common import (
    TEXTURES_ROOT,
    Clock,
    auroc_heatmap,
    ensure_textures,
    markdown_table,
    open_store,
    parser,
    write_table,
)
from anomalab.metrics import aupro, image_auroc, pixel_auroc
from anomalab.nets.effnet_lite0 import LEVELS
from anomalab.registry import create

# ---- settings --------------------------------------------------------------------------------------
IMAGE_SIZE = 224  # Lite0's native input side; the textures (128 px) are upsampled to it
PAPER_MEAN, PAPER_LEVEL7 = 0.948, 0.967  # Rippel et al. 2020, EfficientNet-B4, MVTec AD image AUROC
KEY = ("category", "image_size")  # what identifies a row of results.jsonl
log = logging.getLogger(__name__)


# ---- run -------------------------------------------------------------------------------------------
def run_category(category: str, args) -> dict:
    train = load_mvtec(args.data, category, "train")
    test = load_mvtec(args.data, category, "test")
    with Clock() as fit:
        det = create("gaussian", image_size=args.image_size).fit(train)
    with Clock() as score:
        per_level = det.level_scores(test.images).numpy()
        maps = det.score_map(test.images)
    labels, masks = test.labels.numpy(), test.masks.numpy()
    scores = per_level.sum(1)
    category_figures(category, test, scores, maps, args.out)
    return {
        "category": category, "image_size": args.image_size, "n_train": len(train), "n_test": len(test),
        "image_auroc": image_auroc(labels, scores),
        "level_auroc": {str(lv): image_auroc(labels, per_level[:, i]) for i, lv in enumerate(LEVELS)},
        "patch_max_auroc": image_auroc(labels, maps.flatten(1).amax(1).numpy()),
        "pixel_auroc": pixel_auroc(masks, maps.numpy()), "aupro": aupro(masks, maps.numpy()),
        "fit_s": fit.wall_s, "score_s": score.wall_s,
    }


def main(argv: list[str] | None = None) -> None:
    p = parser("gaussian_textures", __doc__)
    p.add_argument("--data", type=Path, default=TEXTURES_ROOT, help="MVTec-layout root holding the categories")
    p.add_argument("--categories", nargs="+", default=None, help="default: the three textures")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    args = p.parse_args(argv)
    categories = args.categories or list(CATEGORIES)
    torch.manual_seed(0)
    ensure_textures(args.data, categories)
    store = open_store(args.out, KEY)
    for category in categories:
        if (category, args.image_size) in store:
            log.info("%s already done (results.jsonl): skipped", category)
            continue
        store.add(run_category(category, args))
    rows = [store.get((c, args.image_size)) for c in categories]
    level_figure(rows, args.out / "level_auroc.png")
    print(write_table(args.out, table_lines(rows)))
    print(f"figures and tables in {args.out}")


# ---- table -----------------------------------------------------------------------------------------
def _cells(r: dict) -> list[str]:
    return [f"{r['image_auroc']:.3f}", *[f"{r['level_auroc'][str(lv)]:.3f}" for lv in LEVELS],
            f"{r['patch_max_auroc']:.3f}", f"{r['pixel_auroc']:.3f}", f"{r['aupro']:.3f}"]


def table_lines(rows: list[dict]) -> list[str]:
    body = [[r["category"], *_cells(r)] for r in rows]
    if rows:
        mean = {"image_auroc": np.mean([r["image_auroc"] for r in rows]),
                "level_auroc": {str(lv): np.mean([r["level_auroc"][str(lv)] for r in rows]) for lv in LEVELS},
                **{k: np.mean([r[k] for r in rows]) for k in ("patch_max_auroc", "pixel_auroc", "aupro")}}
        body.append(["**mean (ours, Lite0, textures)**", *_cells(mean)])
    paper = [f"{PAPER_MEAN:.3f}", *["" for _ in LEVELS], "", "", ""]
    paper[LEVELS.index(7) + 1] = f"{PAPER_LEVEL7:.3f}"
    body.append(["paper (B4, MVTec AD mean)", *paper])
    total = sum(r["fit_s"] + r["score_s"] for r in rows)
    size, n_train = (rows[0]["image_size"], rows[0]["n_train"]) if rows else ("?", "?")
    head = ["category", "all levels", *[f"L{lv}" for lv in LEVELS], "patch max", "pixel AUROC", "AUPRO"]
    return [*markdown_table(head, body), "",
            f"Image AUROC; L1 = stem ... L8 = last MBConv stage, L9 = head conv. Input {size} px, "
            f"{n_train} train images per category, nothing trained (1 run: the method is deterministic). "
            f"Feature extraction + fit + scoring: {total:.0f} s in all on 1 CPU thread (shared machine)."]


# ---- figures ---------------------------------------------------------------------------------------
def category_figures(category: str, test, scores: np.ndarray, maps: torch.Tensor, out: Path) -> None:
    """Score histogram; input / mask / map of the 4 highest-scored defects and the 2 lowest-scored good images."""
    from anomalab.report import plots

    labels = test.labels.numpy()
    plots.score_histogram(scores, labels, out / f"hist_{category}.png", title=f"gaussian, {category}")
    order = np.argsort(-scores)
    pick = list(order[labels[order] == 1][:4]) + list(order[labels[order] == 0][-2:])
    plots.image_grid([("input", test.images[pick]), ("mask", test.masks[pick]), ("map", maps[pick])],
                     out / f"maps_{category}.png", col_titles=[test.names[i] for i in pick],
                     title=f"gaussian patch maps, {category}", map_rows=("map",))


def level_figure(rows: list[dict], path: Path) -> Path:
    data = np.array([[r["level_auroc"][str(lv)] for lv in LEVELS] + [r["image_auroc"]] for r in rows])
    return auroc_heatmap(data, [r["category"] for r in rows], [f"L{lv}" for lv in LEVELS] + ["sum"], path,
                         "gaussian (Lite0): image AUROC per feature level")


if __name__ == "__main__":
    main()
