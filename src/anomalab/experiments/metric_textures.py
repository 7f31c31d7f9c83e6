"""Deep metric learning for defect detection (the "AnomalyTwin" write-up): the source's four experiments
on the scikit-image textures, or on any MVTec AD categories (--mvtec-root DIR --categories NAME...).

  1 multiclass    one classifier on the good images of all chosen categories; tested per category
  2 binary        good vs one real defect class (--binary-defect, per category) moved from the test set
                  into training (--binary-count of its images; default all of them)
  3 anomaly_twin  self-supervised: every image twinned, the twin gets a fresh random scar; every head
  4 tuned_twin    twins get defects shaped after the KNOWN defect modes: kinds (--tuned-defects) and
                  generator options (--defect-option) per category (uses defect knowledge: not a fair
                  anomaly detector, kept separate as in the source)
  0 none          no metric training: ImageNet features through an untrained embedding (floor)

Score of every cell: min cosine distance to the training embeddings; image AUROC per head and category.
The source's claim to test: (1) and (2) fail, (3) works with ArcFace/CosFace best, (4) lifts every
category. Reference: AnomalyTwin's published MVTec AD means (ResNet-18, 224 px, whole net trained).
One row per experiment x head x seed x setting x category in results.jsonl; a rerun skips finished cells.

CPU budget (ours): Lite0 at IMAGE_SIZE px, only the last TRAIN_BLOCKS MBConv blocks + head conv +
embedding trained, EPOCHS epochs, SEEDS seeds; `--paper-setting` switches to 224 px, the whole network,
20 epochs and 3 seeds (hours on a CPU; not run here).

    anomalab experiment metric_textures [--experiments 0 1 2 3 4] [--heads arcface cosface] [--seeds 0 1 2]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from anomalab.data.folder import load_mvtec
from anomalab.data.textures import CATEGORIES, DEFECT_TYPES
from anomalab.detectors.metric import HEADS
from anomalab.detectors.metric.detector import check_defect_options
from anomalab.errors import ParameterError
from anomalab.experiments._common import (
    TEXTURES_ROOT,
    Clock,
    auroc_heatmap,
    ensure_textures,
    fmt,
    markdown_table,
    mean_std,
    open_store,
    parser,
    pyplot,
    reopen,
    save_figure,
    write_table,
)
from anomalab.metrics import image_auroc
from anomalab.registry import create
from anomalab.types import ImageSet

# ---- settings --------------------------------------------------------------------------------------
IMAGE_SIZE = 128  # px (source: 224)
TRAIN_BLOCKS = 4  # last MBConv blocks trained (Lite0 has 16; source trained all of ResNet-18)
EPOCHS = 8  # training epochs of every metric-learning cell (experiment 0 trains none)
BATCH_SIZE = 32
LR = 1e-3  # Adam
SEEDS = (0,)
BINARY_DEFECT = "blob"  # experiment 2 on the textures: the real stains join the training set (MVTec
# categories: their first defect class in alphabetical order, unless --binary-defect names one)
BINARY_COUNT = 0  # images of that class moved into training; 0 = all of them (the source moved the class)
SOURCE_CATEGORIES = ("capsule", "carpet", "leather", "cable")  # --mvtec-root default: the source's experiment 1
# The source's per-category image AUROC (ArcFace): experiment 3 (anomaly twin) -> experiment 4 (tuned
# synthesis); its text names the last one pill, its figure shows capsule.
SOURCE_TUNED = {"screw": (0.623, 0.91), "transistor": (0.89, 0.958), "grid": (0.798, 0.999), "capsule": (0.70, 0.935)}
EXPERIMENTS = {0: "none", 1: "multiclass", 2: "binary", 3: "anomaly_twin", 4: "tuned_twin"}
EXPERIMENT_HEADS = {0: ("softmax",), 1: ("softmax", "arcface", "cosface"), 2: ("softmax", "arcface", "cosface"),
                    3: HEADS, 4: ("arcface", "cosface")}  # the heads each experiment trains by default
# AnomalyTwin's published MVTec AD means (14 categories, ResNet-18, anomaly twin; docs/detectors/metric.md)
REFERENCE = {"softmax": 0.863, "l2_softmax": 0.759, "arcface": 0.894, "cosface": 0.845, "sphereface": 0.866,
             "center": 0.860}
FIGURE_HEAD = "arcface"  # the head whose histograms, Grad-CAM grids and t-SNE plots are drawn (seed 0)
CELL = ("experiment", "head", "seed", "image_size", "train_blocks", "epochs")  # one fitted setting
KEY = (*CELL, "category", "variant")  # what identifies a row of results.jsonl (variant: see `variant`)
log = logging.getLogger(__name__)


# ---- run -------------------------------------------------------------------------------------------
def _per_category(items: list[str] | None, what: str, categories: list[str]) -> dict[str | None, str]:
    """`[CATEGORY=]VALUE` items -> {category or None (= every category): value}."""
    out: dict[str | None, str] = {}
    for item in items or []:
        cat, sep, value = item.partition("=")
        if not sep:
            cat, value = None, item
        if cat is not None and cat not in categories:
            raise ParameterError(f"{what} {item}: category '{cat}' is not one of --categories "
                                 f"({', '.join(categories)})")
        if not value:
            raise ParameterError(f"{what} {item}: expected [CATEGORY=]VALUE")
        out[cat] = value
    return out


def _number(text: str, item: str):
    try:
        v = float(text)
    except ValueError:
        raise ParameterError(f"--defect-option {item}: '{text}' is not a number") from None
    return int(v) if v.is_integer() and "." not in text else v


def defect_plan(args) -> dict[str, tuple[tuple[str, ...], dict[str, dict]]]:
    """Experiment 4's synthesis per category: (defect kinds, {kind: {generator option: value}}), from
    --tuned-defects [CATEGORY=]KIND[,KIND...] and --defect-option [CATEGORY:]KIND.OPTION=VALUE[,VALUE]
    (a pair is a (low, high) range). Checked against anomalab.generate.defects: one ParameterError."""
    kinds = _per_category(args.tuned_defects, "--tuned-defects", args.categories)
    plan = {}
    for c in args.categories:
        text = kinds.get(c, kinds.get(None))
        plan[c] = (tuple(text.split(",")) if text else tuple(DEFECT_TYPES), {})
    for item in args.defect_option or []:
        target, sep, value = item.partition("=")
        cat, colon, rest = target.rpartition(":")
        kind, dot, option = rest.partition(".")
        if not sep or not dot or not option or not value:
            raise ParameterError(f"--defect-option {item}: expected [CATEGORY:]KIND.OPTION=VALUE[,VALUE]")
        if colon and cat not in args.categories:
            raise ParameterError(f"--defect-option {item}: category '{cat}' is not one of --categories "
                                 f"({', '.join(args.categories)})")
        parts = [_number(v, item) for v in value.split(",")]
        # with a category: that category (its kinds must include KIND); without: every category using KIND
        targets = [cat] if colon else [c for c in args.categories if kind in plan[c][0]]
        for c in targets:
            if kind not in plan[c][0]:
                raise ParameterError(f"--defect-option {item}: {kind} is not among {c}'s tuned defects "
                                     f"({', '.join(plan[c][0])})")
            plan[c][1].setdefault(kind, {})[option] = parts[0] if len(parts) == 1 else parts
        if not targets:
            raise ParameterError(f"--defect-option {item}: no category's tuned defects include {kind}")
    for c, (defects, options) in plan.items():
        check_defect_options(defects, options, owner=f"experiment 4, {c}")
    return plan


def binary_defect(category: str, test: ImageSet, args) -> str:
    """Experiment 2's moved defect class of `category` (see BINARY_DEFECT)."""
    names = [n for n in test.meta["class_names"] if n != "good"]
    chosen = _per_category(args.binary_defect, "--binary-defect", args.categories)
    name = chosen.get(category, chosen.get(None))
    if name is None:
        name = BINARY_DEFECT if BINARY_DEFECT in names else sorted(names)[0]
    if name not in names:
        raise ParameterError(f"--binary-defect: {category} has no defect class '{name}'; "
                             f"its classes: {', '.join(sorted(names))}")
    return name


def variant(exp: int, category: str, data: dict, args) -> str | None:
    """What besides CELL a row of experiment 2 or 4 depends on: the moved class and count, or the
    tuned synthesis (kinds and options) of the category; None for the other experiments."""
    if exp == 2:
        return f"{binary_defect(category, data[category][1], args)} x {args.binary_count or 'all'}"
    if exp == 4:
        defects, options = args.plan[category]
        return ",".join(defects) + (" " + json.dumps(options, sort_keys=True) if options else "")
    return None


def binary_split(train: ImageSet, test: ImageSet, defect: str = BINARY_DEFECT, count: int = BINARY_COUNT
                 ) -> tuple[ImageSet, ImageSet]:
    """Move the first `count` test images of class `defect` (0 = all of them) into training (label 1)."""
    cls = test.meta["class_names"].index(defect)
    moved = np.flatnonzero(test.classes.numpy() == cls)
    moved = moved[:count] if count else moved
    kept = np.setdiff1d(np.arange(len(test)), moved)
    extra = test.subset(moved)
    good = ImageSet(images=train.images, labels=torch.zeros(len(train), dtype=torch.long), names=train.names)
    bad = ImageSet(images=extra.images, labels=torch.ones(len(extra), dtype=torch.long), names=extra.names)
    return ImageSet.concat([good, bad]), test.subset(kept)


def make_detector(head: str, mode: str, seed: int, args, category: str | None = None):
    defects, options = args.plan[category] if mode == "tuned_twin" else (tuple(DEFECT_TYPES), {})
    det = create("metric", head=head, mode="anomaly_twin" if mode == "none" else mode, image_size=args.image_size,
                 train_blocks=args.train_blocks, epochs=args.epochs, batch_size=BATCH_SIZE, lr=LR, seed=seed,
                 tuned_defects=defects, defect_options=options or None)
    if mode == "none":
        det.epochs = 0  # experiment 0 trains nothing (create() accepts only epochs >= 1)
    det.progress = False
    return det


def run_cell(exp: int, head: str, seed: int, data: dict, args) -> list[dict]:
    """Fit the detector(s) of experiment `exp` and score every category: one row per category."""
    mode = EXPERIMENTS[exp]
    settings = {"image_size": args.image_size, "train_blocks": args.train_blocks,
                "epochs": 0 if mode == "none" else args.epochs, "seed": seed}
    rows = []
    with Clock() as clock:
        if mode == "multiclass":
            sets = [data[c][0] for c in args.categories]
            train = ImageSet.concat([ImageSet(images=s.images, names=s.names) for s in sets])
            train.classes = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sets)])
            det = make_detector(head, mode, seed, args).fit(train)
            fits = {c: (det, train, data[c][1]) for c in args.categories}
        else:
            fits = {}
            for c in args.categories:
                train, test = data[c]
                if mode == "binary":
                    train, test = binary_split(train, test, binary_defect(c, test, args), args.binary_count)
                det = make_detector(head, mode, seed, args, c).fit(train)
                fits[c] = (det, train if mode != "binary" else train.subset(train.labels == 0), test)
        for c, (det, reference, test) in fits.items():
            auroc = image_auroc(test.labels.numpy(), det.score(test.images).numpy())
            rows.append({"experiment": exp, "mode": mode, "head": head, "category": c, **settings,
                         "variant": variant(exp, c, data, args), "n_test": len(test),
                         "image_auroc": auroc,
                         "final_train_accuracy": det.history_[-1]["accuracy"] if det.history_ else None})
            if head == FIGURE_HEAD and seed == 0 and mode in ("anomaly_twin", "multiclass"):
                cell_figures(det, reference, test, f"{mode}_{head}_{c}", args.out)
    for r in rows:
        r["cell_wall_s"], r["cell_cpu_s"] = clock.wall_s, clock.cpu_s
        r["threads"] = torch.get_num_threads()  # results are bit-identical at one thread count, not across them
    return rows


def parse_args(argv: list[str] | None = None):
    p = parser("metric_textures", __doc__)
    root = p.add_mutually_exclusive_group()
    root.add_argument("--data", type=Path, default=None,
                      help=f"MVTec-layout root holding the categories (default: {TEXTURES_ROOT}, built when missing)")
    root.add_argument("--mvtec-root", type=Path, default=None,
                      help="an MVTec AD folder (one subfolder per category); images are loaded at --image-size "
                           f"and --categories defaults to the source's {' '.join(SOURCE_CATEGORIES)}")
    p.add_argument("--categories", nargs="+", default=None,
                   help=f"categories to run (default: the textures {' '.join(CATEGORIES)})")
    p.add_argument("--experiments", nargs="+", type=int, default=[0, 3, 1, 2, 4], choices=sorted(EXPERIMENTS))
    p.add_argument("--heads", nargs="+", default=None, choices=HEADS,
                   help="restrict the heads (default: each experiment's own list)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--train-blocks", type=int, default=TRAIN_BLOCKS)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--binary-defect", nargs="+", default=None, metavar="[CATEGORY=]DEFECT",
                   help=f"experiment 2's moved defect class, for all or one category (default: {BINARY_DEFECT} "
                        "on the textures, else the category's first defect class alphabetically)")
    p.add_argument("--binary-count", type=int, default=BINARY_COUNT,
                   help="images of that class moved into training (default 0: all of them)")
    p.add_argument("--tuned-defects", nargs="+", default=None, metavar="[CATEGORY=]KIND[,KIND]",
                   help=f"experiment 4's defect kinds, for all or one category (default: {','.join(DEFECT_TYPES)})")
    p.add_argument("--defect-option", nargs="+", default=None, metavar="[CATEGORY:]KIND.OPTION=VALUE[,VALUE]",
                   help="experiment 4's generator options, e.g. screw:scratch.width=1,2 (a pair is a range)")
    p.add_argument("--paper-setting", action="store_true",
                   help="224 px, whole network trained, 20 epochs, seeds 0 1 2 (CPU-hours)")
    args = p.parse_args(argv)
    if args.paper_setting:
        args.image_size, args.train_blocks, args.epochs, args.seeds = 224, 16, 20, [0, 1, 2]
    args.root = args.mvtec_root or args.data or TEXTURES_ROOT
    if args.categories is None:
        args.categories = list(SOURCE_CATEGORIES if args.mvtec_root else CATEGORIES)
    if args.binary_count < 0:
        raise ParameterError(f"--binary-count must be >= 0 (0 = all), got {args.binary_count}")
    if args.mvtec_root is not None:
        missing = [c for c in args.categories if not (args.mvtec_root / c / "train").is_dir()]
        if missing:
            raise ParameterError(f"--mvtec-root {args.mvtec_root}: no category folder with a train/ "
                                 f"subfolder for {', '.join(missing)}")
    _per_category(args.binary_defect, "--binary-defect", args.categories)  # category names checked now
    args.plan = defect_plan(args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    make_detector(FIGURE_HEAD, "anomaly_twin", 0, args)  # checks the settings before any data is built
    ensure_textures(args.root, args.categories)
    size = args.image_size if args.mvtec_root else None  # MVTec photos are 700-1024 px: load them small
    data = {c: (load_mvtec(args.root, c, "train", size=size), load_mvtec(args.root, c, "test", size=size))
            for c in args.categories}
    store = open_store(args.out, KEY)
    for exp in args.experiments:
        for head in [h for h in EXPERIMENT_HEADS[exp] if args.heads is None or h in args.heads]:
            for seed in args.seeds:
                cell = (exp, head, seed, args.image_size, args.train_blocks, 0 if exp == 0 else args.epochs)
                store = reopen(store)  # another process may share the folder and have done the cell
                if all((*cell, c, variant(exp, c, data, args)) in store for c in args.categories):
                    continue
                log.info("experiment %d (%s), head %s, seed %d", exp, EXPERIMENTS[exp], head, seed)
                new = [store.add(r) for r in run_cell(exp, head, seed, data, args)]
                print(f"exp {exp} {head} seed {seed}: " + ", ".join(f"{r['category']} {r['image_auroc']:.3f}"
                                                                    for r in new)
                      + f" ({new[0]['cell_cpu_s']:.0f} CPU-s)", flush=True)
    current = [r for r in store if r["image_size"] == args.image_size and r["train_blocks"] == args.train_blocks
               and r["epochs"] in (0, args.epochs) and r["category"] in args.categories
               and r.get("variant") == variant(r["experiment"], r["category"], data, args)]
    print(write_table(args.out, table_lines(current, args)))
    heatmap_figure(current, args.categories, args.out / "auroc_heatmap.png",
                   "MVTec AD" if args.mvtec_root else "textures")
    print(f"figures and tables in {args.out}")


# ---- table -----------------------------------------------------------------------------------------
def _per_cell(rows: list[dict]) -> dict[tuple[int, str], dict[str, list[float]]]:
    """(experiment, head) -> category -> AUROC of every seed, in experiment order."""
    cells: dict[tuple[int, str], dict[str, list[float]]] = {}
    for r in rows:
        cells.setdefault((r["experiment"], r["head"]), {}).setdefault(r["category"], []).append(r["image_auroc"])
    return dict(sorted(cells.items()))


def table_lines(rows: list[dict], args) -> list[str]:
    cats = list(args.categories)
    body = []
    for (exp, head), per_cat in _per_cell(rows).items():
        means = [float(np.mean(per_cat[c])) if c in per_cat else float("nan") for c in cats]
        body.append([f"{exp} {EXPERIMENTS[exp]}", head, *(mean_std(per_cat.get(c, [])) for c in cats),
                     f"{np.nanmean(means):.3f}", max(len(v) for v in per_cat.values()),
                     f"{REFERENCE[head]:.3f}" if exp == 3 else ""])
    cpu = sum({tuple(r[k] for k in CELL): r["cell_cpu_s"] for r in rows}.values())
    variants = {(r["experiment"], r["category"]): r["variant"] for r in rows if r.get("variant")}
    moved = "; ".join(f"{c}: {v}" for (e, c), v in sorted(variants.items()) if e == 2)
    tuned = "; ".join(f"{c}: {v}" for (e, c), v in sorted(variants.items()) if e == 4)
    ours = {c: {e: float(np.mean([r["image_auroc"] for r in rows if r["experiment"] == e and r["category"] == c
                                  and r["head"] == FIGURE_HEAD] or [np.nan])) for e in (3, 4)} for c in cats}
    source = [[c, f"{SOURCE_TUNED[c][0]:.3f}" if c in SOURCE_TUNED else "-",
               f"{SOURCE_TUNED[c][1]:.3f}" if c in SOURCE_TUNED else "-",
               fmt(ours[c][3]) if c in ours else "not run", fmt(ours[c][4]) if c in ours else "not run"]
              for c in dict.fromkeys([*SOURCE_TUNED, *cats])]
    data = f"MVTec AD ({args.root})" if args.mvtec_root else f"the textures ({args.root})"
    return [f"Data: {data}.", "",
            *markdown_table(["experiment", "head", *cats, "mean", "seeds", "AnomalyTwin MVTec mean"], body), "",
            f"Image AUROC (mean ± std over seeds). Lite0 at {args.image_size} px, last {args.train_blocks} "
            f"MBConv blocks + head conv + 128-d embedding trained, {args.epochs} epochs, batch {BATCH_SIZE}, "
            f"Adam {LR}; experiment 0 trains nothing. Total {cpu / 60:.1f} CPU-minutes. Experiment 2 moved "
            f"into training: {moved or '(not run)'}. Experiment 4 synthesis (uses the defect modes of the test "
            f"set, as the source's tuned synthesis): {tuned or '(not run)'}.", "",
            f"The source's per-category image AUROC ({FIGURE_HEAD}, MVTec AD, ResNet-18 at 224 px) beside this "
            "run's (- : the source gives none; not run: not among --categories):", "",
            *markdown_table(["category", "source exp 3 (anomaly twin)", "source exp 4 (tuned)",
                             f"this run exp 3 ({FIGURE_HEAD})", f"this run exp 4 ({FIGURE_HEAD})"], source)]


# ---- figures ---------------------------------------------------------------------------------------
def heatmap_figure(rows: list[dict], cats: list[str], path: Path, data_name: str = "textures") -> Path | None:
    cells = _per_cell(rows)
    if not cells:
        return None
    data = np.array([[float(np.mean(v[c])) if c in v else float("nan") for c in cats] for v in cells.values()])
    data = np.c_[data, np.nanmean(data, axis=1)]
    labels = [f"{exp} {EXPERIMENTS[exp]} / {head}" for exp, head in cells]
    return auroc_heatmap(data, labels, [*cats, "mean"], path, f"metric learning on {data_name} (Lite0): image AUROC")


def cell_figures(det, train: ImageSet, test: ImageSet, tag: str, out: Path) -> None:
    """Score histogram, Grad-CAM grid (test image, its map, its nearest training image), t-SNE.
    train: the detector's reference images (the normal training images it embedded)."""
    from sklearn.manifold import TSNE

    from anomalab.report import plots

    scores = det.score(test.images).numpy()
    labels = test.labels.numpy()
    plots.score_histogram(scores, labels, out / f"hist_{tag}.png", title=tag)
    order = np.argsort(-scores)
    pick = list(order[labels[order] == 1][:5]) + list(order[labels[order] == 0][-1:])
    cams = det.score_map(test.images[pick])
    nearest = det.nearest(test.images[pick])
    plots.image_grid([("test", test.images[pick]), ("mask", test.masks[pick]), ("Grad-CAM", cams),
                      ("nearest train", train.images[nearest])], out / f"gradcam_{tag}.png",
                     col_titles=[f"{test.names[i]}\n{scores[i]:.3f}" for i in pick],
                     title=f"Grad-CAM of the min cosine distance, {tag}", map_rows=("Grad-CAM",))
    emb = torch.cat([det.embed(train.images), det.embed(test.images)]).numpy()
    xy = TSNE(n_components=2, perplexity=20, init="pca", random_state=0).fit_transform(emb)
    names = ["train good"] + [f"test {c}" for c in test.meta["class_names"]]
    groups = np.concatenate([np.zeros(len(train), int), test.classes.numpy() + 1])
    fig, ax = pyplot().subplots(figsize=(5, 4))
    for g, name in enumerate(names):
        sel = groups == g
        if sel.any():
            ax.scatter(*xy[sel].T, s=8 if g else 4, alpha=0.4 if g == 0 else 0.9, label=name,
                       color="lightgrey" if g == 0 else None)
    ax.legend(frameon=False, fontsize=7)
    ax.set_title(f"t-SNE of embeddings, {tag}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    save_figure(fig, out / f"tsne_{tag}.png")


if __name__ == "__main__":
    main()
