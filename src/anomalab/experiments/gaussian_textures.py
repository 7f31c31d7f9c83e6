"""Gaussian AD on pretrained features (Rippel 2020, METHODS.md section 2) on the scikit-image textures.

Per category: image AUROC of the sum over all nine levels and of every level alone (the paper's level
study), and pixel AUROC / AUPRO of the patch variant's maps (plus the image AUROC of the map maximum).
Reference: the paper's EfficientNet-B4 on MVTec AD (15 categories): mean image AUROC 94.8, level 7 alone
96.7. Ours is EfficientNet-Lite0 on three synthetic-defect textures, so only the shape is comparable.

    anomalab experiment gaussian_textures [--image-size 224] [--categories brick grass gravel]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from anomalab.data.folder import load_mvtec
from anomalab.data.textures import CATEGORIES, make_textures
from anomalab.detectors.gaussian import Gaussian
from anomalab.metrics import aupro, image_auroc, pixel_auroc
from anomalab.nets.effnet_lite0 import LEVELS

IMAGE_SIZE = 224  # Lite0's native input side; the textures (128 px) are upsampled to it
TEXTURES_ROOT = "runs/datasets/textures"  # built with make_textures' defaults when missing
PAPER_MEAN, PAPER_LEVEL7 = 0.948, 0.967  # Rippel et al. 2020, EfficientNet-B4, MVTec AD image AUROC
log = logging.getLogger(__name__)


def run_category(category: str, args) -> dict:
    train = load_mvtec(args.data, category, "train")
    test = load_mvtec(args.data, category, "test")
    t0 = time.perf_counter()
    det = Gaussian(image_size=args.image_size).fit(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_level = det.level_scores(test.images).numpy()
    maps = det.score_map(test.images)
    score_s = time.perf_counter() - t0
    labels, masks = test.labels.numpy(), test.masks.numpy()
    scores = per_level.sum(1)
    out = Path(args.out)
    from anomalab.report import plots

    plots.score_histogram(scores, labels, out / f"hist_{category}.png", title=f"gaussian, {category}")
    order = np.argsort(-scores)
    pick = list(order[labels[order] == 1][:4]) + list(order[labels[order] == 0][-2:])
    plots.image_grid([("input", test.images[pick]), ("mask", test.masks[pick]), ("map", maps[pick])],
                     out / f"maps_{category}.png", col_titles=[test.names[i] for i in pick],
                     title=f"gaussian patch maps, {category}", map_rows=("map",))
    return {
        "category": category, "image_size": args.image_size, "n_train": len(train), "n_test": len(test),
        "image_auroc": image_auroc(labels, scores),
        "level_auroc": {str(lv): image_auroc(labels, per_level[:, i]) for i, lv in enumerate(LEVELS)},
        "patch_max_auroc": image_auroc(labels, maps.flatten(1).amax(1).numpy()),
        "pixel_auroc": pixel_auroc(masks, maps.numpy()), "aupro": aupro(masks, maps.numpy()),
        "fit_s": fit_s, "score_s": score_s,
    }


def write_table(rows: list[dict], out: Path) -> Path:
    head = ["category", "all levels", *[f"L{lv}" for lv in LEVELS], "patch max", "pixel AUROC", "AUPRO"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(r):
        return [f"{r['image_auroc']:.3f}", *[f"{r['level_auroc'][str(lv)]:.3f}" for lv in LEVELS],
                f"{r['patch_max_auroc']:.3f}", f"{r['pixel_auroc']:.3f}", f"{r['aupro']:.3f}"]

    for r in rows:
        lines.append("| " + " | ".join([r["category"], *fmt(r)]) + " |")
    if rows:
        mean = {
            "image_auroc": np.mean([r["image_auroc"] for r in rows]),
            "level_auroc": {str(lv): np.mean([r["level_auroc"][str(lv)] for r in rows]) for lv in LEVELS},
            **{k: np.mean([r[k] for r in rows]) for k in ("patch_max_auroc", "pixel_auroc", "aupro")},
        }
        lines.append("| " + " | ".join(["**mean (ours, Lite0, textures)**", *fmt(mean)]) + " |")
    paper = [f"{PAPER_MEAN:.3f}", *["" for _ in LEVELS], "", "", ""]
    paper[LEVELS.index(7) + 1] = f"{PAPER_LEVEL7:.3f}"
    lines.append("| " + " | ".join(["paper (B4, MVTec AD mean)", *paper]) + " |")
    total = sum(r["fit_s"] + r["score_s"] for r in rows)
    size, n_train = (rows[0]["image_size"], rows[0]["n_train"]) if rows else ("?", "?")
    lines += ["", f"Image AUROC; L1 = stem ... L8 = last MBConv stage, L9 = head conv. Input {size} px, "
              f"{n_train} train images per category, nothing trained (1 run: the method is deterministic). "
              f"Feature extraction + fit + scoring: {total:.0f} s in all on 1 CPU thread (shared machine)."]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def level_heatmap(rows: list[dict], path: Path) -> None:
    from anomalab.report.plots import _save, plt

    data = np.array([[r["level_auroc"][str(lv)] for lv in LEVELS] + [r["image_auroc"]] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    im = ax.imshow(data, vmin=0.3, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(LEVELS) + 1), [f"L{lv}" for lv in LEVELS] + ["sum"])
    ax.set_yticks(range(len(rows)), [r["category"] for r in rows])
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.7 else "k")
    fig.colorbar(im, ax=ax, label="image AUROC")
    ax.set_title("gaussian (Lite0): image AUROC per feature level")
    _save(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gaussian_textures")
    p.add_argument("--data", default=TEXTURES_ROOT, help="MVTec-layout root holding the categories")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    missing = [c for c in args.categories if not (Path(args.data) / c / "train").is_dir()]
    if missing and args.data == TEXTURES_ROOT:
        make_textures(args.data, categories=tuple(c for c in missing if c in CATEGORIES))
    jsonl = out / "results.jsonl"
    done = {}
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            if r["image_size"] == args.image_size:
                done[r["category"]] = r
    for category in args.categories:
        if category in done:
            log.info("%s already done (results.jsonl): skipped", category)
            continue
        row = run_category(category, args)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[category] = row
    rows = [done[c] for c in args.categories]
    level_heatmap(rows, out / "level_auroc.png")
    table = write_table(rows, out)
    print(table.read_text())
    print(f"figures and tables in {out}")


if __name__ == "__main__":
    main()
