"""MNIST one-class reproduction of the GAN detectors (METHODS.md sections 2 and 6, GANomaly protocol).

For each anomaly digit d and seed s: train on 80 % of the other nine digits (shuffled with s), test on
the remaining 20 % plus ALL images of digit d; image AUROC (and AUPRC, EGBAD's paper metric) of the
model after the last epoch, networks in eval mode. Results are appended to `results.jsonl` (one line
per detector x digit x seed x budget), so a cut run resumes skipping finished cells; `results.md`,
the AUROC bars, score histograms, best/worst image grids and GANomaly loss curves are rebuilt from it.

Paper-length run (about 15 epochs x 10 digits x 3 seeds x 4 detectors: many CPU hours):
    anomalab experiment gan_mnist
Reduced run: pass --epochs, --digits, --seeds, --detectors and --set DET.PARAM=VALUE overrides
(`DET.train_limit=N` trains on a random N-image subset of the training split, `DET.test_limit=N` scores
a stratified random N-image subset of the test set: AnoGAN's per-query latent search makes its scoring
the expensive part).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from anomalab.data.mnist import load_mnist
from anomalab.data.splits import one_class_split
from anomalab.data.transforms import prepare
from anomalab.evaluate import evaluate
from anomalab.registry import REGISTRY, create

log = logging.getLogger(__name__)

DETECTORS = ("ganomaly", "skip_ganomaly", "egbad", "anogan")
BASELINES = ("knn", "pca")  # cheap references scored on the same splits
DIGITS = tuple(range(10))
SEEDS = (0, 1, 2)
# Reference AUROCs on the same protocol and the same 5,000 digits at 32x32 (measured with anomalib 2.7.0's
# GANomaly: honest last-epoch evaluation) and a raw-pixel kNN, per anomaly digit.
REFERENCE = {
    "anomalib GANomaly, 15 epochs": {0: 0.848, 1: 0.377},
    "anomalib GANomaly, 1 epoch": {0: 0.925, 8: 0.753},
    "raw-pixel kNN": {0: 0.973, 1: 0.494, 8: 0.900},
}
GRID_DIGIT = 0  # the digit whose histograms and image grids the docs show


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="anomalab experiment gan_mnist", description=__doc__.splitlines()[0])
    p.add_argument("--digits", type=int, nargs="+", default=list(DIGITS), help="anomaly digits")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: each paper's)")
    p.add_argument("--set", action="append", default=[], metavar="DET.PARAM=VALUE",
                   help="override a detector parameter, e.g. egbad.lr=1e-4 or anogan.n_steps=50")
    p.add_argument("--mnist-root", default=None, help="folder with the MNIST IDX files (default: 5,000 digits)")
    p.add_argument("--out", default="runs/gan_mnist")
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


def overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        det, _, param = key.partition(".")
        if not value or not param:
            raise ValueError(f"--set expects DET.PARAM=VALUE, got {item!r}")
        out.setdefault(det, {})[param] = json.loads(value) if value[0] in "-0123456789[{tf" else value
    return out


def budget_of(name: str, epochs: int | None, extra: dict) -> str:
    parts = [f"epochs={epochs}" if epochs is not None else "epochs=paper"]
    parts += [f"{k}={v}" for k, v in sorted(extra.items())]
    return " ".join(parts)


def stratified(test, limit: int, seed: int):
    """A random subset of `limit` test images with the test set's share of anomalies."""
    rng = np.random.default_rng(seed)
    labels = test.labels.numpy()
    n_bad = int(round(limit * labels.mean()))
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == 1), n_bad, replace=False),
                          rng.choice(np.flatnonzero(labels == 0), limit - n_bad, replace=False)])
    return test.subset(np.sort(idx))


def done_keys(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    return {(r["detector"], r["digit"], r["seed"], r["budget"]) for r in map(json.loads, path.read_text().splitlines())}


def append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def official_protocol_scores(det, x_train, test, epochs: int) -> list[float]:
    """GANomaly's official evaluation, for comparison: after every epoch, score with BatchNorm in train
    mode (batch statistics of the test batches); the official code reports the best of these AUROCs."""
    from anomalab.metrics import image_auroc

    aurocs = []
    for epoch in range(epochs):
        if epoch:
            det.train_more(x_train, epochs=1)
        g = det.generator_
        saved = {k: v.clone() for k, v in g.state_dict().items()}
        g.train()
        with torch.no_grad():
            s = torch.cat([det._score_batch(prepare(test.images[i : i + 64], det.input_shape_))
                           for i in range(0, len(test), 64)])
        g.load_state_dict(saved)
        aurocs.append(image_auroc(test.labels.numpy(), s.numpy()))
    return aurocs


def bn_diagnostics(det, train, test) -> dict[str, float]:
    """GANomaly's AUROC under four BatchNorm treatments of the same fitted model (see --bn-diagnostics)."""
    from anomalab.detectors._gan import to_signed
    from anomalab.metrics import image_auroc

    g, labels = det.generator_, test.labels.numpy()
    x = prepare(test.images, det.input_shape_)

    def auroc(train_mode: bool, order: torch.Tensor) -> float:
        saved = {k: v.clone() for k, v in g.state_dict().items()}
        g.train(train_mode)
        s = torch.empty(len(x))
        with torch.no_grad():
            for i in range(0, len(x), 64):
                s[order[i : i + 64]] = det._score_batch(x[order[i : i + 64]])
        g.load_state_dict(saved)
        g.eval()
        return image_auroc(labels, s.numpy())

    in_order = torch.arange(len(x))  # the test set lists normals first, then anomalies (official order)
    shuffled = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    out = {"eval_running_stats": auroc(False, in_order), "train_bn_label_sorted_batches": auroc(True, in_order),
           "train_bn_shuffled_batches": auroc(True, shuffled)}
    det.recalibrate_bn(to_signed(prepare(train.images, det.input_shape_)))
    out["eval_after_bn_reestimation"] = auroc(False, in_order)
    return out


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


def run_cell(name: str, params: dict, limits: dict, train, test, args, out: Path, budget: str = "") -> dict:
    det = create(name, **params)
    det.progress = False
    steps: list[dict] = []
    if hasattr(det, "_train_step"):  # per-step losses for the loss curves
        step = det._train_step
        det._train_step = lambda b: steps.append(step(b)) or steps[-1]
    if limits.get("train_limit"):
        rng = np.random.default_rng(train.meta["seed"])
        train = train.subset(np.sort(rng.choice(len(train), int(limits["train_limit"]), replace=False)))
    t0 = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - t0
    if limits.get("test_limit"):
        test = stratified(test, int(limits["test_limit"]), seed=0)
    ev = evaluate(det, test, dataset=f"mnist-{test.meta['anomaly_class']}")
    row = {"image_auroc": ev.metrics["image_auroc"], "aupr": ev.metrics["aupr"], "fit_s": fit_s,
           "score_s": ev.timings["score_s"], "n_train": len(train), "n_test": len(test),
           "history": getattr(det, "history_", None), "steps": steps[:: max(1, len(steps) // 200)]}
    digit, seed = test.meta["anomaly_class"], test.meta["seed"]
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if not args.report_only:
        sets = overrides(args.set)
        data = load_mnist(args.mnist_root) if args.mnist_root else load_mnist()
        names = list(args.detectors) + ([] if args.no_baselines else [b for b in BASELINES if b in REGISTRY])
        done = done_keys(results)
        for seed in args.seeds:
            for digit in args.digits:
                train, test = one_class_split(data, digit, train_frac=0.8, seed=seed)
                for name in names:
                    extra = dict(sets.get(name, {}))
                    limits = {k: extra.pop(k) for k in ("train_limit", "test_limit") if k in extra}
                    budget = budget_of(name, args.epochs if name in DETECTORS else None, {**extra, **limits})
                    if name in BASELINES:
                        budget = " ".join(f"{k}={v}" for k, v in sorted(extra.items())) or "default"
                    if (name, digit, seed, budget) in done:
                        continue
                    params = {**({"seed": seed} if name in DETECTORS else {}), **extra}
                    if name in DETECTORS and args.epochs is not None:
                        params["epochs"] = args.epochs
                    log.info("%s digit %d seed %d (%s)", name, digit, seed, budget)
                    row = run_cell(name, params, limits, train, test, args, out, budget)
                    row.update(detector=name, digit=digit, seed=seed, budget=budget,
                               data=test.meta.get("name"), threads=args.threads)
                    append(results, row)
                    print(f"{name:14s} digit {digit} seed {seed} [{budget}]: AUROC {row['image_auroc']:.3f} "
                          f"(fit {row['fit_s']:.0f} s, score {row['score_s']:.0f} s)", flush=True)
    return report(results, out)


def _groups(rows: list[dict]) -> dict[tuple[str, str], dict[int, list[dict]]]:
    groups: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["detector"], r["budget"]), {}).setdefault(r["digit"], []).append(r)
    return groups


def _cell(rs: list[dict], key: str = "image_auroc") -> str:
    v = np.array([r[key] for r in rs])
    return f"{v.mean():.3f} ± {v.std():.3f} ({len(v)})" if len(v) > 1 else f"{v[0]:.3f} (1)"


def ganomaly_losses(row: dict, path: Path) -> None:
    """GANomaly's logged losses against the training step (one panel per loss)."""
    from anomalab.report.plots import _save, plt

    keys = ["loss_g", "adv", "con", "enc", "loss_d"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6))
    for ax, k in zip(axes, keys):
        ax.plot([s[k] for s in row["steps"]], lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step")
    fig.suptitle(f"GANomaly training losses, anomaly digit {row['digit']}, seed {row['seed']} [{row['budget']}]",
                 fontsize=10, y=1.06)
    _save(fig, path)


def report(results: Path, out: Path) -> dict:
    """results.md (mean ± std over seeds, number of seeds in brackets) and the figures, from the JSON lines."""
    from anomalab.report.plots import bar_chart

    if not results.is_file():
        raise FileNotFoundError(f"no results yet at {results}")
    rows, seen = [], set()
    for r in map(json.loads, results.read_text().splitlines()):  # two runs sharing a file may repeat a cell
        key = (r["detector"], r["digit"], r["seed"], r["budget"])
        if key not in seen:
            seen.add(key)
            rows.append(r)
    groups = _groups(rows)
    order = sorted(groups, key=lambda k: ((DETECTORS + BASELINES).index(k[0]), k[1]))
    digits = sorted({r["digit"] for r in rows})
    lines = ["# GAN detectors, MNIST one-class (image AUROC, mean ± std over seeds, seeds in brackets)", "",
             "Last epoch, networks in eval mode, no test-set model selection. Budget per column header; "
             "fit/score times are wall-clock seconds per cell (one torch thread, shared machine).", ""]
    header = ["anomaly digit"] + [f"{d} [{b}]" for d, b in order] + list(REFERENCE)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for digit in digits:
        cells = [str(digit)] + [_cell(groups[k][digit]) if digit in groups[k] else "" for k in order]
        cells += [f"{REFERENCE[r][digit]:.3f}" if digit in REFERENCE[r] else "" for r in REFERENCE]
        lines.append("| " + " | ".join(cells) + " |")
    means = ["mean"] + [f"{np.mean([np.mean([r['image_auroc'] for r in rs]) for rs in groups[k].values()]):.3f}"
                        f" ({len(groups[k])} digits)" for k in order] + [""] * len(REFERENCE)
    lines.append("| " + " | ".join(means) + " |")
    egbad = [k for k in order if k[0] == "egbad"]
    if egbad:
        lines += ["", "EGBAD AUPRC (anomalous digit = positive, its paper's metric):", "",
                  "| anomaly digit | " + " | ".join(f"egbad [{b}]" for _, b in egbad) + " |",
                  "|---|" + "---|" * len(egbad)]
        for digit in digits:
            lines.append(f"| {digit} | " + " | ".join(_cell(groups[k][digit], "aupr") if digit in groups[k] else ""
                                                     for k in egbad) + " |")
    timing = ["", "| detector [budget] | cells | mean fit s | mean score s | test images |", "|---|---|---|---|---|"]
    for k in order:
        rs = [r for v in groups[k].values() for r in v]
        timing.append(f"| {k[0]} [{k[1]}] | {len(rs)} | {np.mean([r['fit_s'] for r in rs]):.0f} | "
                      f"{np.mean([r['score_s'] for r in rs]):.1f} | {rs[0]['n_test']} |")
    lines += timing
    official = [r for r in rows if "official_protocol_aurocs" in r]
    if official:
        lines += ["", "GANomaly under the official code's protocol (BatchNorm in train mode at test time, best "
                  "epoch chosen on the test set: NOT a valid result, shown for comparison):", "",
                  "| digit | seed | per-epoch AUROC | best | last (official protocol) |", "|---|---|---|---|---|"]
        for r in official:
            a = r["official_protocol_aurocs"]
            lines.append(f"| {r['digit']} | {r['seed']} | {', '.join(f'{v:.3f}' for v in a)} | {max(a):.3f} | "
                         f"{a[-1]:.3f} |")
    diag = [r for r in rows if "bn_diagnostics" in r]
    if diag:
        keys = list(diag[0]["bn_diagnostics"])
        lines += ["", "GANomaly AUROC of the same fitted model under four BatchNorm treatments:", "",
                  "| digit | seed | budget | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
        for r in diag:
            lines.append(f"| {r['digit']} | {r['seed']} | {r['budget']} | "
                         + " | ".join(f"{r['bn_diagnostics'][k]:.3f}" for k in keys) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    # Figures: per-digit AUROC bars (one budget per detector: the one with most cells), GANomaly losses.
    best = {}
    for d, b in order:
        if d in DETECTORS + BASELINES and (d not in best or len(groups[(d, b)]) > len(groups[(d, best[d])])):
            best[d] = b
    series = {f"{d}": [np.mean([r["image_auroc"] for r in groups[(d, b)].get(g, [])]) if g in groups[(d, b)]
                       else np.nan for g in digits] for d, b in best.items()}
    errors = {f"{d}": [np.std([r["image_auroc"] for r in groups[(d, b)].get(g, [])]) if g in groups[(d, b)]
                       else 0 for g in digits] for d, b in best.items()}
    refs = {name: [vals.get(g, np.nan) for g in digits] for name, vals in REFERENCE.items() if "GANomaly" in name}
    bar_chart([str(g) for g in digits], series, out / "auroc_bars.png", errors=errors,
              title="MNIST one-class: image AUROC per anomaly digit", references=refs)
    curves = [r for r in rows if r["detector"] == "ganomaly" and r.get("steps")]
    if curves:
        r = max(curves, key=lambda r: (len(r["steps"]), -r["digit"]))
        ganomaly_losses(r, out / "ganomaly_losses.png")
    print((out / "results.md").read_text())
    return {"rows": len(rows), "table": str(out / "results.md")}


if __name__ == "__main__":
    main()
