"""Feature detectors (patchcore, padim, gaussian with both image scores) x backbones (EfficientNet-Lite0,
1, 2) on the strided brick split and the three-texture benchmark.

Data: `anomalab make-dataset strided` (brick: 225 training crops of 128 px on a 16 px grid of the top half,
65 test crops on a 32 px grid of the bottom half, half with a scratch or blob) and the texture benchmark
(`make-dataset textures` defaults: brick, grass, gravel). Every cell is one deterministic fit at the
detectors' defaults except `backbone` (and gaussian's `image_score`): image AUROC, pixel AUROC, AUPRO,
fit and score images/s (one torch thread). References: anomalib 2.7.0 on the same strided brick split
with Lite0 (measured: PatchCore 0.998 / pixel 0.956, PaDiM 0.986 / 0.958, DFM 0.952 / 0.884) and the
papers' MVTec AD means (PatchCore 99.2 % with WRN-50, PaDiM 95.3 %, Rippel et al. 94.8 % with B4).

`--shift` also asks, per texture photo, whether its top rows (where the benchmark's training crops come
from) look unlike its bottom rows (its test crops) to the detectors: fitted on windows of the top half's
left columns, scored on windows of the right columns from the top half (no pixel shared with training)
and from the bottom half, each set half defective (`shift_cell`).

    anomalab experiment features_textures [--backbones effnet_lite0 ...] [--shift]
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from anomalab.data.folder import load_mvtec
from anomalab.evaluation import evaluate
from anomalab.experiments._common import (
    TEXTURES_ROOT,
    ensure_textures,
    markdown_table,
    mean_std,
    open_store,
    parser,
    report_table,
)
from anomalab.metrics import image_auroc
from anomalab.registry import create

log = logging.getLogger(__name__)

# ---- settings --------------------------------------------------------------------------------------
DETECTORS = {  # row name -> (detector, extra parameters)
    "patchcore": ("patchcore", {}),
    "patchcore 1 %": ("patchcore", {"coreset_ratio": 0.01}),  # the fast-fit setting (Lite0 rows only by default)
    "padim": ("padim", {}),
    "gaussian": ("gaussian", {}),
    "gaussian map max": ("gaussian", {"image_score": "map_max"}),
}
BACKBONES = ("effnet_lite0", "effnet_lite1", "effnet_lite2")
STRIDED_ROOT = Path("runs/datasets")  # make_strided writes brick_strided here when missing
DATASETS = ("brick_strided", "brick", "grass", "gravel")
TEXTURES = ("brick", "grass", "gravel")
CROP = 128  # window side of the --shift diagnosis (px)
ANOMALIB = {"patchcore": (0.998, 0.956), "padim": (0.986, 0.958)}  # strided brick, Lite0 (image, pixel)
PAPERS = {"patchcore": 0.992, "padim": 0.953, "gaussian": 0.948}  # MVTec AD mean image AUROC
KEY = ("dataset", "detector", "backbone", "kind")


def parse(argv):
    p = parser("features_textures", __doc__)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    p.add_argument("--detectors", nargs="+", default=[d for d in DETECTORS if d != "patchcore 1 %"],
                   choices=list(DETECTORS), help="rows to run (`patchcore 1 %%` too: --detectors 'patchcore 1 %%')")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--shift", action="store_true", help="also the held-out training-row crops (Lite0)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def data(name: str):
    """(train, test) of a data set name."""
    if name == "brick_strided":
        if not (STRIDED_ROOT / name / "train").is_dir():
            from anomalab.data.textures import make_strided

            make_strided(STRIDED_ROOT)
        root, cat = STRIDED_ROOT, name
    else:
        ensure_textures(TEXTURES_ROOT, [name])
        root, cat = TEXTURES_ROOT, name
    return load_mvtec(root, cat, split="train"), load_mvtec(root, cat, split="test")


def run_cell(dataset: str, row: str, backbone: str) -> dict:
    name, extra = DETECTORS[row]
    train, test = data(dataset)
    det = create(name, backbone=backbone, **extra)
    det.progress = False
    t0 = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - t0
    ev = evaluate(det, test)
    m = ev.metrics
    return {"image_auroc": m["image_auroc"], "pixel_auroc": m.get("pixel_auroc"), "aupro": m.get("aupro"),
            "fit_images_per_s": len(train) / fit_s, "score_images_per_s": len(test) / ev.timings["score_s"],
            "n_train": len(train), "n_test": len(test)}


def _windows(photo: np.ndarray, ys, xs) -> torch.Tensor:
    return torch.from_numpy(np.stack([photo[y : y + CROP, x : x + CROP] for y in ys for x in xs]))[:, None]


def _half_defective(windows: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """A copy with a seeded half of the windows given a scratch or a blob (in turn), and the labels."""
    from anomalab.generate.defects import DEFECTS

    out, labels = windows.clone(), np.zeros(len(windows), dtype=int)
    for j, i in enumerate(np.sort(rng.choice(len(windows), len(windows) // 2, replace=False))):
        img, _ = DEFECTS[("scratch", "blob")[j % 2]](windows[i].numpy(), rng)
        out[i], labels[i] = torch.as_tensor(np.asarray(img, dtype=np.float32)), 1
    return out, labels


def shift_cell(category: str, row: str) -> dict:
    """Is the photo's top (training rows) unlike its bottom (test rows) to the detector? Fitted on the
    128 px windows of the top half's left columns (x <= 160, 16 px grid); scored on two sets of windows in
    the same right columns (x 320-384): `same rows` from the top half (no pixel shared with training) and
    `other rows` from the bottom half, each with a seeded half given a scratch or a blob. AUROC of the
    other rows' good windows against the same rows' good ones (0.5: no shift), and the defect AUROC of
    each set (the benchmark's construction is `other rows`)."""
    name, extra = DETECTORS[row]
    from anomalab.data.textures import texture_photo

    photo = texture_photo(category)
    train = _windows(photo, range(0, 129, 16), range(0, 161, 16))
    same = _windows(photo, range(0, 129, 16), range(320, 385, 16))
    other = _windows(photo, range(256, 385, 16), range(320, 385, 16))
    rng = np.random.default_rng(0)
    same_x, same_y = _half_defective(same, rng)
    other_x, other_y = _half_defective(other, rng)
    det = create(name, **extra)
    det.progress = False
    det.fit(train)
    s_same, s_other = det.score(same_x).numpy(), det.score(other_x).numpy()
    good_same, good_other = s_same[same_y == 0], s_other[other_y == 0]
    shift = image_auroc(np.r_[np.zeros(len(good_same)), np.ones(len(good_other))], np.r_[good_same, good_other])
    return {"test_good_vs_held_out": shift, "defective_vs_test_good": image_auroc(other_y, s_other),
            "defective_vs_held_out": image_auroc(same_y, s_same), "n_train": len(train), "n_held_out": len(same)}


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    store = open_store(args.out, KEY)
    if not args.report_only:
        for backbone in args.backbones:  # Lite0 first: the cheapest rows land first
            for dataset in args.datasets:
                for row in args.detectors:
                    if (dataset, row, backbone, "eval") in store:
                        continue
                    r = run_cell(dataset, row, backbone)
                    r.update(dataset=dataset, detector=row, backbone=backbone, kind="eval", threads=args.threads)
                    store.add(r)
                    print(f"{dataset:14s} {row:17s} {backbone}: image AUROC {r['image_auroc']:.3f}, pixel "
                          f"{r['pixel_auroc'] or float('nan'):.3f}", flush=True)
        if args.shift:
            for category in TEXTURES:
                for row in args.detectors:
                    if (category, row, "effnet_lite0", "shift") in store:
                        continue
                    r = shift_cell(category, row)
                    r.update(dataset=category, detector=row, backbone="effnet_lite0", kind="shift")
                    store.add(r)
                    print(f"shift {category:8s} {row:17s}: test-row good vs held-out training-row good AUROC "
                          f"{r['test_good_vs_held_out']:.3f}", flush=True)
    return report(store, args.out)


# ---- tables ----------------------------------------------------------------------------------------
def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table_lines(rows: list[dict]) -> list[str]:
    ev = [r for r in rows if r["kind"] == "eval"]
    order = {b: i for i, b in enumerate(BACKBONES)}
    ev.sort(key=lambda r: (list(DETECTORS).index(r["detector"]), order[r["backbone"]]))
    lines = ["# Feature detectors x backbones: strided brick split and the three-texture benchmark", "",
             "One deterministic fit per cell at the detectors' defaults (image size 224, 10 % coreset), one "
             "torch thread, shared 2-core machine (speeds: compare within a column).", ""]
    cells = {(r["dataset"], r["detector"], r["backbone"]): r for r in ev}
    combos = list(dict.fromkeys((r["detector"], r["backbone"]) for r in ev))
    body = []
    for det, bb in combos:
        s = cells.get(("brick_strided", det, bb))
        tex = [cells.get((c, det, bb)) for c in TEXTURES]
        mean = mean_std([t["image_auroc"] for t in tex if t]) if all(tex) else "-"
        ref = ANOMALIB.get(det)  # anomalib's default coreset is 10 %: compared with `patchcore` only
        body.append([det, bb.replace("effnet_", ""),
                     _f(s and s["image_auroc"]), _f(s and s["pixel_auroc"]), _f(s and s["aupro"]),
                     f"{s['fit_images_per_s']:.1f} / {s['score_images_per_s']:.1f}" if s else "-",
                     f"{ref[0]:.3f} / {ref[1]:.3f}" if ref and bb == "effnet_lite0" else "",
                     *(_f(t and t["image_auroc"]) for t in tex), mean.split(" ±")[0],
                     _f(np.mean([t["pixel_auroc"] for t in tex]) if all(tex) and all(t["pixel_auroc"] for t in tex)
                        else None),
                     f"{PAPERS[det.split()[0]]:.3f}" if bb == "effnet_lite0" else ""])
    lines += markdown_table(["detector", "backbone", "strided brick image AUROC", "pixel AUROC", "AUPRO",
                             "fit / score img/s", "anomalib 2.7.0 (Lite0) image / pixel",
                             *(f"{c} image AUROC" for c in TEXTURES), "texture mean", "texture mean pixel",
                             "paper (MVTec AD mean)"], body)
    shift = [r for r in rows if r["kind"] == "shift"]
    if shift:
        lines += ["", "## Does the benchmark's row split hold the texture numbers back?", "",
                  "Fitted on 99 windows (128 px, 16 px grid) of the top half's left columns; scored on 45 "
                  "windows of the right columns from the top half (`same rows`, no pixel shared with "
                  "training) and 45 from the bottom half (`other rows`, as the benchmark's test crops), half "
                  "of each set with a scratch or a blob. Shift = AUROC of the other rows' good windows "
                  "against the same rows' good ones (0.5: the rows look alike).", "",
                  *markdown_table(["category", "detector", "shift (other-row good vs same-row good)",
                                   "defect AUROC, other rows (the benchmark's construction)",
                                   "defect AUROC, same rows"],
                                  [[r["dataset"], r["detector"], _f(r["test_good_vs_held_out"]),
                                    _f(r["defective_vs_test_good"]), _f(r["defective_vs_held_out"])]
                                   for r in sorted(shift, key=lambda r: (r["dataset"], r["detector"]))])]
    return lines


def report(store, out: Path) -> dict:
    rows = report_table(store, out, table_lines)
    return {"rows": len(rows), "table": str(out / "results.md")}


if __name__ == "__main__":
    main()
