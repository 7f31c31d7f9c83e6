"""GAN detectors (GANomaly, Skip-GANomaly, EGBAD, AnoGAN) on one-class MNIST, the GANomaly protocol.

For each anomaly digit d and seed s: train on 80 % of the other nine digits (shuffled with s), test on
the remaining 20 % plus ALL images of digit d (the protocol of Akcay et al. 2018, GANomaly); image AUROC
(and AUPRC, EGBAD's paper metric) of the model after the last epoch, networks in eval mode. Results are
appended to `results.jsonl` (one row per detector x digit x seed x budget), so a cut run resumes skipping
finished cells, and a cell cut midway resumes from its checkpoints (`checkpoints/<cell>/` in the output
folder: training state every 5 minutes, the fitted detector, the test scores so far; removed once the cell's
row is stored), ending as it would have uncut; `results.md`, the AUROC bars, score histograms, best/worst
image grids and GANomaly loss curves are rebuilt from it.
Detector pages: docs/detectors/{ganomaly,skip_ganomaly,egbad,anogan}.md.

Paper-length run (about 15 epochs x 10 digits x 3 seeds x 4 detectors: many CPU hours):
    anomalab experiment gan_mnist
Reduced run: pass --epochs, --digits, --seeds, --detectors and --set DET.PARAM=VALUE overrides
(`DET.train_limit=N` trains on a random N-image subset of the training split, `DET.test_limit=N` scores
a stratified random N-image subset of the test set: AnoGAN's per-query latent search makes its scoring
the expensive part). A bad `--set` value fails with one ParameterError before any training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anomalab.data.mnist import load_mnist
from anomalab.data.splits import one_class_split
from anomalab.data.transforms import prepare
from anomalab.detector import Trainable
from anomalab.evaluation import evaluate
from anomalab.experiments._common import (
    ResumableScores,
    detector_sets,
    markdown_table,
    mean_std,
    open_store,
    parser,
    pyplot,
    reopen,
    report_table,
    save_figure,
)
from anomalab.params import signature_defaults, validate
from anomalab.registry import REGISTRY, create, detector_class
from anomalab.registry import load as load_detector
from anomalab.train.epochs import Checkpoint

log = logging.getLogger(__name__)

# ---- settings --------------------------------------------------------------------------------------
DETECTORS = ("ganomaly", "skip_ganomaly", "egbad", "anogan")  # each at its paper's settings by default
BASELINES = ("knn", "pca")  # cheap references scored on the same splits
DIGITS = tuple(range(10))  # anomaly digits
SEEDS = (0, 1, 2)  # shuffles of the normal digits before the 80 / 20 split (and the detectors' seeds)
KEY = ("detector", "digit", "seed", "budget")  # what identifies a row of results.jsonl
# Reference AUROCs on the same protocol and the same 5,000 digits at 32x32 (measured with anomalib 2.7.0's
# GANomaly: honest last-epoch evaluation) and a raw-pixel kNN, per anomaly digit.
REFERENCE = {
    "anomalib GANomaly, 15 epochs": {0: 0.848},
    "anomalib GANomaly, 1 epoch": {0: 0.925, 1: 0.377, 8: 0.753},
    "raw-pixel kNN": {0: 0.973, 1: 0.494, 8: 0.900},
}
GRID_DIGIT = 0  # the digit whose histograms and image grids the docs show
CHECKPOINT_EVERY_S = 300  # a GAN cell's training state is saved at the first epoch end after this many seconds
SCORE_CHUNK = 4  # test scores are saved every this many of the detector's scoring batches
SCORE_BATCH = 64  # test batch size of the official protocol's batch-statistics scoring (the official code's)


class CellLimits:
    """Settings of a cell that `--set DET.PARAM=VALUE` takes besides the detector's own parameters."""

    def __init__(self, train_limit: int | None = None, test_limit: int | None = None):
        self.train_limit = train_limit  # train on a random subset of this many training images
        self.test_limit = test_limit  # score a stratified random subset of this many test images


# ---- run -------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = parser("gan_mnist", __doc__)
    p.add_argument("--digits", type=int, nargs="+", default=list(DIGITS), help="anomaly digits")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: each paper's)")
    p.add_argument("--set", action="append", default=[], metavar="DET.PARAM=VALUE",
                   help="override a detector parameter, e.g. egbad.lr=1e-4 or anogan.n_steps=50")
    p.add_argument("--mnist-root", default=None, help="folder with the MNIST IDX files (default: 5,000 digits)")
    p.add_argument("--no-baselines", action="store_true", help="skip the knn/pca reference rows")
    p.add_argument("--official-protocol", action="store_true",
                   help="also score GANomaly as its official code does (BatchNorm in train mode, best epoch "
                        "on the test set): test-set model selection, for comparison only")
    p.add_argument("--bn-diagnostics", action="store_true",
                   help="also score GANomaly with BatchNorm in train mode (test batches in the official label-"
                        "sorted order and shuffled) and after re-estimating BatchNorm statistics on the "
                        "training images: how much the score depends on the BatchNorm statistics")
    p.add_argument("--report-only", action="store_true", help="rebuild table and figures from results.jsonl")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def plan(name: str, epochs: int | None, extra: dict) -> tuple[dict, dict, str]:
    """(detector parameters, cell limits, budget tag) of one detector; `extra` holds its checked `--set`
    values. The budget tag names every setting that differs from the paper's (results.jsonl's key)."""
    extra = dict(extra)
    limits = {k: extra.pop(k) for k in ("train_limit", "test_limit") if k in extra}
    if name in BASELINES:
        return extra, limits, " ".join(f"{k}={v}" for k, v in sorted(extra.items())) or "default"
    params = {**extra, **({"epochs": epochs} if epochs is not None else {})}
    validate(detector_class(name), params, owner=name)  # --epochs too
    tagged = {**extra, **limits}
    defaults = signature_defaults(detector_class(name))
    if "bn_recalibrate" in defaults:  # always named: its default changed (rows before it say False)
        tagged.setdefault("bn_recalibrate", defaults["bn_recalibrate"])
    budget = " ".join([f"epochs={epochs}" if epochs is not None else "epochs=paper",
                       *(f"{k}={v}" for k, v in sorted(tagged.items()))])
    return params, limits, budget


def stratified(test, limit: int, seed: int):
    """A random subset of `limit` test images with the test set's share of anomalies."""
    rng = np.random.default_rng(seed)
    labels = test.labels.numpy()
    n_bad = int(round(limit * labels.mean()))
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == 1), n_bad, replace=False),
                          rng.choice(np.flatnonzero(labels == 0), limit - n_bad, replace=False)])
    return test.subset(np.sort(idx))


@contextmanager
def batch_statistics(net: nn.Module) -> Iterator[None]:
    """Inside: every BatchNorm of `net` normalises with the statistics of the batch it is given (as in
    training mode) and updates no running average; the running averages are back on exit."""
    bns = [m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    saved = [(m.running_mean, m.running_var) for m in bns]
    for m in bns:  # without running averages an eval-mode BatchNorm uses the batch's statistics
        m.running_mean = m.running_var = None
    try:
        yield
    finally:
        for m, (mean, var) in zip(bns, saved, strict=True):
            m.running_mean, m.running_var = mean, var


def scores_in_order(det, images: torch.Tensor, order: torch.Tensor, batch_stats: bool) -> np.ndarray:
    """Scores of `images`, scored in batches of SCORE_BATCH taken in `order`; with `batch_stats`, the
    generator's BatchNorms use each test batch's statistics (the official GANomaly code's test mode)."""
    s = np.empty(len(images))
    if batch_stats:
        with batch_statistics(det.generator_):
            s[order.numpy()] = det.score(images[order], batch_size=SCORE_BATCH).numpy()
    else:
        s[order.numpy()] = det.score(images[order], batch_size=SCORE_BATCH).numpy()
    return s


def official_protocol_scores(det, x_train, test, epochs: int) -> list[float]:
    """GANomaly's official evaluation, for comparison: after every epoch, score with BatchNorm in train
    mode (batch statistics of the test batches); the official code reports the best of these AUROCs."""
    from anomalab.metrics import image_auroc

    aurocs = []
    in_order = torch.arange(len(test))
    for epoch in range(epochs):
        if epoch:
            det.train_more(x_train, epochs=1)
        aurocs.append(image_auroc(test.labels.numpy(), scores_in_order(det, test.images, in_order, True)))
    return aurocs


def bn_diagnostics(det, train, test) -> dict[str, float]:
    """GANomaly's AUROC under four BatchNorm treatments of the same fitted model (see --bn-diagnostics)."""
    from anomalab.metrics import image_auroc

    labels = test.labels.numpy()

    def auroc(batch_stats: bool, order: torch.Tensor) -> float:
        return image_auroc(labels, scores_in_order(det, test.images, order, batch_stats))

    in_order = torch.arange(len(test))  # the test set lists normals first, then anomalies (official order)
    shuffled = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    out = {"eval_running_stats": auroc(False, in_order), "train_bn_label_sorted_batches": auroc(True, in_order),
           "train_bn_shuffled_batches": auroc(True, shuffled)}
    det.recalibrate_bn(prepare(train.images, det.input_shape_) * 2 - 1)  # it takes images in [-1, 1]
    out["eval_after_bn_reestimation"] = auroc(False, in_order)
    return out


def cell_folder(out: Path, name: str, digit: int, seed: int, budget: str) -> Path:
    """Where a cell keeps what lets a cut run resume it (`checkpoints/<cell>` in the output folder)."""
    return out / "checkpoints" / re.sub(r"[^A-Za-z0-9=._-]+", "_", f"{name}_digit{digit}_seed{seed}_{budget}")


CELL_FILES = ("train.pt", "fit.json", "scores.npz")  # what a cell writes besides its saved detector/


def remove_cell_folder(folder: Path) -> None:
    """Remove what the cell wrote to `folder` (CELL_FILES, hidden temporaries of them, the saved detector),
    then the folder and checkpoints/ if that left them empty. Anything else put there stays, with its folder."""
    for name in CELL_FILES:
        (folder / name).unlink(missing_ok=True)
        for tmp in folder.glob(f".{name}.tmp-*"):  # left by a write a kill interrupted
            tmp.unlink(missing_ok=True)
    if (folder / "detector" / "detector.json").is_file():
        shutil.rmtree(folder / "detector")
    for empty in (folder, folder.parent):
        with contextlib.suppress(OSError):  # not empty (another process's cell, a file of the user's) or gone
            empty.rmdir()


def fit_resumable(det, train, folder: Path) -> tuple[object, float, dict]:
    """Fit a GAN detector with its training state saved to `folder/train.pt` every CHECKPOINT_EVERY_S, then
    save it to `folder/detector` (with the fit time in `fit.json`) and drop the training state; when a
    saved detector is there already, load it instead. -> (detector, fit seconds, notes for the row)."""
    saved, fit_file = folder / "detector", folder / "fit.json"
    if fit_file.is_file() and (saved / "detector.json").is_file():
        det = load_detector(saved)
        return det, float(json.loads(fit_file.read_text())["fit_s"]), {"resumed": "scoring"}
    det.checkpoint = Checkpoint(folder / "train.pt", CHECKPOINT_EVERY_S)
    t0 = time.perf_counter()
    det.fit(train)
    fit_s = det.checkpoint.elapsed_before_s + time.perf_counter() - t0
    notes = ({"resumed": "training", "steps_logged_after_epoch": det.checkpoint.resumed_epochs}
             if det.checkpoint.resumed_epochs else {})
    det.checkpoint = None
    det.save(saved)
    fit_file.write_text(json.dumps({"fit_s": fit_s}))
    (folder / "train.pt").unlink(missing_ok=True)
    return det, fit_s, notes


def run_cell(name: str, params: dict, limits: dict, train, test, args, out: Path, budget: str = "") -> dict:
    det = create(name, **params)
    det.progress = False
    steps: list[dict] = []
    if isinstance(det, Trainable):  # per-step losses for the loss curves
        det.on_step = steps.append
    if limits.get("train_limit"):
        rng = np.random.default_rng(train.meta["seed"])
        train = train.subset(np.sort(rng.choice(len(train), int(limits["train_limit"]), replace=False)))
    digit, seed = test.meta["anomaly_class"], test.meta["seed"]
    folder = cell_folder(out, name, digit, seed, budget)
    notes: dict = {}
    if name in DETECTORS:  # minutes to an hour per cell: resumable
        det, fit_s, notes = fit_resumable(det, train, folder)
        det.progress = False
    else:
        t0 = time.perf_counter()
        det.fit(train)
        fit_s = time.perf_counter() - t0
    if limits.get("test_limit"):
        test = stratified(test, int(limits["test_limit"]), seed=0)
    scorer = (ResumableScores(det, folder / "scores.npz", SCORE_CHUNK * det.score_batch_size)
              if name in DETECTORS else det)
    ev = evaluate(scorer, test, dataset=f"mnist-{test.meta['anomaly_class']}")
    row = {"image_auroc": ev.metrics["image_auroc"], "aupr": ev.metrics["aupr"], "fit_s": fit_s,
           "score_s": scorer.seconds if name in DETECTORS else ev.timings["score_s"], "n_train": len(train),
           "n_test": len(test), "history": getattr(det, "history_", None), "steps": steps[:: max(1, len(steps) // 200)],
           **notes}
    if digit == GRID_DIGIT and seed == args.seeds[0] and name in DETECTORS:
        from anomalab.report.plots import score_histogram

        tag = budget.replace(" ", "_")  # one figure per budget: runs of other budgets do not overwrite it
        score_histogram(ev.scores, ev.labels, out / "figures" / f"hist_{name}_digit{digit}_{tag}.png",
                        title=f"{name}, anomaly digit {digit} [{budget}] (AUROC {row['image_auroc']:.3f})")
        grid_figure(det, name, test, ev.scores, out / "figures" / f"grid_{name}_digit{digit}_{tag}.png")
    if args.bn_diagnostics and name == "ganomaly":
        row["bn_diagnostics"] = bn_diagnostics(det, train, test)
    if args.official_protocol and name == "ganomaly":
        epochs = params.get("epochs", det.epochs)
        det2 = create(name, **{**params, "epochs": 1})
        det2.progress = False
        det2.fit(train)
        aurocs = official_protocol_scores(det2, prepare(train.images, det2.input_shape_), test, epochs)
        row["official_protocol_aurocs"] = aurocs
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    store = open_store(args.out, KEY)
    if not args.report_only:
        names = list(args.detectors) + ([] if args.no_baselines else [b for b in BASELINES if b in REGISTRY])
        sets = detector_sets(args.set, names, extra=CellLimits)
        # every setting checked (and its budget tag fixed) before any data is loaded or anything trained
        plans = {name: plan(name, args.epochs if name in DETECTORS else None, sets.get(name, {})) for name in names}
        data = load_mnist(args.mnist_root)
        for seed in args.seeds:
            for digit in args.digits:
                train, test = one_class_split(data, digit, train_frac=0.8, seed=seed)
                for name, (extra, limits, budget) in plans.items():
                    store = reopen(store)  # another process may share the folder and have done the cell
                    if (name, digit, seed, budget) in store:
                        continue
                    params = {**({"seed": seed} if name in DETECTORS else {}), **extra}
                    log.info("%s digit %d seed %d (%s)", name, digit, seed, budget)
                    row = run_cell(name, params, limits, train, test, args, args.out, budget)
                    row.update(detector=name, digit=digit, seed=seed, budget=budget,
                               data=test.meta.get("name"), threads=args.threads)
                    store.add(row)
                    remove_cell_folder(cell_folder(args.out, name, digit, seed, budget))
                    print(f"{name:14s} digit {digit} seed {seed} [{budget}]: AUROC {row['image_auroc']:.3f} "
                          f"(fit {row['fit_s']:.0f} s, score {row['score_s']:.0f} s)", flush=True)
    return report(reopen(store), args.out)  # with the rows of any process sharing the folder


# ---- table -----------------------------------------------------------------------------------------
def _groups(rows: list[dict]) -> dict[tuple[str, str], dict[int, list[dict]]]:
    """(detector, budget) -> digit -> rows (one per seed), in detector order."""
    groups: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["detector"], r["budget"]), {}).setdefault(r["digit"], []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: ((DETECTORS + BASELINES).index(kv[0][0]), kv[0][1])))


def _cell(rs: list[dict], key: str = "image_auroc") -> str:
    return mean_std((r[key] for r in rs), count=True)


def table_lines(rows: list[dict]) -> list[str]:
    """results.md: AUROC per digit and budget (mean ± std over seeds, seeds in brackets), EGBAD's AUPRC,
    timings, and the official-protocol and BatchNorm comparisons where stored."""
    groups = _groups(rows)
    digits = sorted({r["digit"] for r in rows})
    body = [[digit, *(_cell(g[digit]) if digit in g else "" for g in groups.values()),
             *(f"{REFERENCE[r][digit]:.3f}" if digit in REFERENCE[r] else "" for r in REFERENCE)] for digit in digits]
    body.append(["mean", *(f"{np.mean([np.mean([r['image_auroc'] for r in rs]) for rs in g.values()]):.3f}"
                           f" ({len(g)} digits)" for g in groups.values()), *[""] * len(REFERENCE)])
    lines = ["# GAN detectors, MNIST one-class (image AUROC, mean ± std over seeds, seeds in brackets)", "",
             "Last epoch, networks in eval mode, no test-set model selection. Budget per column header; "
             "fit/score times are wall-clock seconds per cell (one torch thread, shared machine).", "",
             *markdown_table(["anomaly digit", *(f"{d} [{b}]" for d, b in groups), *REFERENCE], body)]
    egbad = [k for k in groups if k[0] == "egbad"]
    if egbad:
        lines += ["", "EGBAD AUPRC (anomalous digit = positive, its paper's metric):", "",
                  *markdown_table(["anomaly digit", *(f"egbad [{b}]" for _, b in egbad)],
                                  [[d, *(_cell(groups[k][d], "aupr") if d in groups[k] else "" for k in egbad)]
                                   for d in digits])]
    timing = []
    for (d, b), g in groups.items():
        rs = [r for v in g.values() for r in v]
        timing.append([f"{d} [{b}]", len(rs), f"{np.mean([r['fit_s'] for r in rs]):.0f}",
                       f"{np.mean([r['score_s'] for r in rs]):.1f}", rs[0]["n_test"]])
    lines += ["", *markdown_table(["detector [budget]", "cells", "mean fit s", "mean score s", "test images"],
                                  timing)]
    lines += not_run_lines(rows)
    official = [r for r in rows if "official_protocol_aurocs" in r]
    if official:
        lines += ["", "GANomaly under the official code's protocol (BatchNorm in train mode at test time, best "
                  "epoch chosen on the test set: NOT a valid result, shown for comparison):", "",
                  *markdown_table(["digit", "seed", "per-epoch AUROC", "best", "last (official protocol)"],
                                  [[r["digit"], r["seed"], ", ".join(f"{v:.3f}" for v in a), f"{max(a):.3f}",
                                    f"{a[-1]:.3f}"] for r in official for a in [r["official_protocol_aurocs"]]])]
    diag = [r for r in rows if "bn_diagnostics" in r]
    if diag:
        keys = list(diag[0]["bn_diagnostics"])
        lines += ["", "GANomaly AUROC of the same fitted model under four BatchNorm treatments:", "",
                  *markdown_table(["digit", "seed", "budget", *keys],
                                  [[r["digit"], r["seed"], r["budget"],
                                    *(f"{r['bn_diagnostics'][k]:.3f}" for k in keys)] for r in diag])]
    return lines


# the paper-length comparison asked for: GANomaly and Skip-GANomaly over 3 seeds, EGBAD and AnoGAN over 1
PAPER_PLAN = {"ganomaly": SEEDS, "skip_ganomaly": SEEDS, "egbad": SEEDS[:1], "anogan": SEEDS[:1]}


def not_run_lines(rows: list[dict]) -> list[str]:
    """The cells of PAPER_PLAN (every digit) without a paper-budget row, per detector, with the measured cost of
    one of its cells (the median: robust to a cell run on a crowded machine) as the reason; nothing when no
    paper-budget row is stored (a reduced-budget table)."""
    paper = [r for r in rows if str(r.get("budget", "")).startswith("epochs=paper")]
    if not paper:
        return []
    done = {(r["detector"], r["digit"], r["seed"]) for r in paper}
    body = []
    for name, seeds in PAPER_PLAN.items():
        missing = [(d, s) for s in seeds for d in DIGITS if (name, d, s) not in done]
        if not missing:
            continue
        cost = [r["fit_s"] + r["score_s"] for r in paper if r["detector"] == name]
        why = (f"not run yet: one cell took {np.median(cost) / 60:.0f} min on one core here (median of {len(cost)})"
               if cost else "not run yet (no cell of it measured)")
        cells = "; ".join(f"seed {s}: digits {', '.join(str(d) for d, ss in missing if ss == s)}"
                          for s in seeds if any(ss == s for _, ss in missing))
        body.append([name, len(missing), cells, why])
    if not body:
        return ["", "Every cell of the paper-length plan has run."]
    return ["", "Cells of the paper-length plan (GANomaly and Skip-GANomaly seeds 0-2, EGBAD and AnoGAN seed 0, "
            "every digit) not run:", "", *markdown_table(["detector", "cells", "which", "why"], body)]


def report(store, out: Path) -> dict:
    """results.md and the figures, from the stored rows."""
    rows = report_table(store, out, table_lines)
    auroc_bars(rows, out / "auroc_bars.png")
    curves = [r for r in rows if r["detector"] == "ganomaly" and r.get("steps")]
    if curves:
        ganomaly_losses(max(curves, key=lambda r: (len(r["steps"]), -r["digit"])), out / "ganomaly_losses.png")
    return {"rows": len(rows), "table": str(out / "results.md")}


# ---- figures ---------------------------------------------------------------------------------------
def auroc_bars(rows: list[dict], path: Path) -> Path:
    """Per-digit AUROC bars (mean ± std over seeds), one budget per detector: the one with most digits."""
    from anomalab.report.plots import bar_chart

    groups = _groups(rows)
    digits = sorted({r["digit"] for r in rows})
    best: dict[str, str] = {}
    for d, b in groups:
        if d not in best or len(groups[(d, b)]) > len(groups[(d, best[d])]):
            best[d] = b
    per_digit = {d: groups[(d, b)] for d, b in best.items()}
    series = {d: [np.mean([r["image_auroc"] for r in g[x]]) if x in g else np.nan for x in digits]
              for d, g in per_digit.items()}
    errors = {d: [np.std([r["image_auroc"] for r in g[x]]) if x in g else 0 for x in digits]
              for d, g in per_digit.items()}
    refs = {name: [vals.get(x, np.nan) for x in digits] for name, vals in REFERENCE.items() if "GANomaly" in name}
    return bar_chart([str(x) for x in digits], series, path, errors=errors,
                     title="MNIST one-class: image AUROC per anomaly digit", references=refs)


def ganomaly_losses(row: dict, path: Path) -> Path:
    """GANomaly's logged losses against the training step (one panel per loss)."""
    keys = ["loss_g", "adv", "con", "enc", "loss_d"]
    fig, axes = pyplot().subplots(1, len(keys), figsize=(3 * len(keys), 2.6))
    for ax, k in zip(axes, keys):
        ax.plot([s[k] for s in row["steps"]], lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step")
    fig.suptitle(f"GANomaly training losses, anomaly digit {row['digit']}, seed {row['seed']} [{row['budget']}]",
                 fontsize=10, y=1.06)
    return save_figure(fig, path)


def grid_figure(det, name: str, test, scores: np.ndarray, path: Path) -> None:
    """Input / reconstruction / map of the 3 highest-scored anomalies, the 3 lowest-scored (missed)
    anomalies and the 3 highest-scored normals (false alarms)."""
    from anomalab.report.plots import image_grid

    labels = test.labels.numpy()
    bad, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    bad = bad[np.argsort(-scores[bad])]
    good = good[np.argsort(-scores[good])]
    pick = np.concatenate([bad[:3], bad[-3:], good[:3]])
    x = test.images[pick]
    if name == "anogan":
        found = det.search(x)
        rec, maps = found["reconstruction"], found["map"]
    else:
        rec, maps = det.reconstruct(x), det.score_map(x)
    titles = [f"{t}\n{scores[i]:.3g}" for t, i in zip(["top anomaly"] * 3 + ["missed"] * 3 + ["false alarm"] * 3,
                                                       pick)]
    image_grid([("input", x), ("reconstruction", rec), ("|x - x_hat|", maps)], path, col_titles=titles,
               title=f"{name}, anomaly digit {test.meta['anomaly_class']}", map_rows=("|x - x_hat|",))


if __name__ == "__main__":
    main()
