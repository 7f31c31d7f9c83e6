"""Continual learning for anomaly detection on MNIST (Wiewel & Yang 2019; docs/continual.md).

Tasks are digits 1..9 in order, digit 0 is the anomaly. The conv28 VAE (the 28x28 convolutional VAE of
docs/detectors/conv_ae_vae.md) learns the tasks one at a time with four strategies (joint = upper bound,
replay = generative replay of the source, ewc, finetune = lower bound); after each task it is evaluated
by image AUROC on held-out normals of the digits seen so far vs the test images of digit 0. Writes
runs/continual_mnist/: results.jsonl (one row per strategy x seed x settings; a rerun skips them),
results.md, figures.

Hyper-parameters are chosen with `--validate`: the same training, evaluated on a fixed validation split
(VALIDATION_SEED) that no reported seed ever trains or tests on; it writes validation.md, a table of
every validation cell in --out. `--source-setting` runs the source's fully-connected VAE (z = 200,
lr 1e-3, score mean |x - x_hat|).

    anomalab experiment continual_mnist --seeds 0 1 2
    anomalab experiment continual_mnist --validate --seeds 100 --out runs/continual_mnist_validation
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from anomalab.experiments._common import Clock, markdown_table, mean_std, open_store, parser, write_table

# ---- settings (our reduced CPU budget; see docs/continual.md) --------------------------------------
STRATEGIES = ["joint", "replay", "ewc", "finetune"]
SEEDS = [0, 1, 2]
EPOCHS = 20  # per task (400 images of one digit: 260 steps of 32)
BATCH_SIZE = 32
# chosen on the validation split, seed 100 (docs/continual.md): (lr, z) in {1e-3, 3e-3} x {8, 32} by the mean
# AUROC over tasks of joint, replay and finetune; then ewc_lambda in {1, 100, 1e4} by EWC's mean AUROC over tasks
LATENT_DIM = 8  # z of the conv28 VAE
LR = 1e-3  # Adam, fresh per task
EWC_LAMBDA = 1.0
FISHER_SAMPLES = 200  # images per task for the diagonal Fisher
REPLAY_FRACTION = 0.5  # source: batch_size / 2 replayed images per step
TEST_FRAC = 0.2  # held-out test share of each normal digit's non-validation images (90 of 450 packaged)
VALIDATION_SEED = 12345  # fixes the validation split; independent of (and never one of) the run seeds
VALIDATION_PER_DIGIT = 50  # packaged digits per class kept out of every seed's training and test images
VALIDATION_FRAC = 0.1  # --mnist-root: share of each digit's 60,000 training images used with --validate
SOURCE_SETTING = {"arch": "mlp", "latent_dim": 200, "lr": 1e-3, "error": "l1"}  # the source's code's VAE
ERROR_NAMES = {"mse": "MSE", "l1": "mean |x - x_hat|"}  # the score's name in tables and figures
SHOW_AFTER = (3, 6, 9)  # tasks after which reconstructions are kept for the figures
JOINT = "equal-steps"  # joint at equal compute; "union" = epochs over all data so far (i times the cost)
N_SHOW = 12  # replayed samples drawn per task in the figures
KEY = ("strategy", "seed", "settings")  # what identifies a row of results.jsonl
STORED = {"joint": "earlier tasks' images", "replay": "decoder copy", "ewc": "Fisher + anchor",
          "finetune": "nothing"}  # what each strategy keeps between tasks (the table's memory column)

log = logging.getLogger(__name__)


# ---- run -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("continual_mnist", __doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per task")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--latent-dim", type=int, default=LATENT_DIM)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--ewc-lambda", type=float, default=EWC_LAMBDA)
    p.add_argument("--fisher-samples", type=int, default=FISHER_SAMPLES)
    p.add_argument("--replay-fraction", type=float, default=REPLAY_FRACTION)
    p.add_argument("--joint", choices=["equal-steps", "union"], default=JOINT,
                   help="joint: about as many steps per task as the others (default), "
                        "or --epochs over the union")
    p.add_argument("--mnist-root", default=None,
                   help="folder of the four MNIST IDX files (docs/continual.md): train on the 60,000 "
                        "training digits, test on the 10,000 test digits (default: the 5,000 packaged "
                        "digits, 50 per digit set aside for validation, 20%% of the rest for testing)")
    p.add_argument("--arch", choices=["conv28", "mlp"], default="conv28",
                   help="VAE network: conv28 (convolutional) or mlp (fully connected on flattened images)")
    p.add_argument("--error", choices=["mse", "l1"], default="mse",
                   help="score: mean squared (mse) or mean absolute (l1) reconstruction error")
    p.add_argument("--source-setting", action="store_true",
                   help="the source's code: --arch mlp --latent-dim 200 --lr 1e-3 --error l1")
    p.add_argument("--validate", action="store_true",
                   help="evaluate on the fixed validation split instead of the test images (for choosing "
                        "hyper-parameters); writes validation.md")
    p.add_argument("--show-after", type=int, nargs="+", default=list(SHOW_AFTER),
                   help="tasks (1-based) after which reconstructions are drawn")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.source_setting:
        for k, v in SOURCE_SETTING.items():
            setattr(args, k, v)
    return args


def settings_key(args: argparse.Namespace, strategy: str) -> dict:
    """What a result depends on: shared settings and the strategy's own parameters."""
    arch = {} if args.arch == "conv28" and args.error == "mse" else {"arch": args.arch, "error": args.error}
    protocol = {"protocol": "validation"} if args.validate else {"protocol": "test-v2"}
    return {"epochs": args.epochs, "batch_size": args.batch_size, "latent_dim": args.latent_dim,
            "lr": args.lr, "mnist_root": args.mnist_root, **arch, **protocol, **strategy_params(strategy, args)}


def validation_split(dataset, per_digit: int | None = None, frac: float | None = None):
    """(rest, validation): per digit, `per_digit` images (or `frac` of them) drawn with VALIDATION_SEED,
    whatever the run's seed, so the validation images are the same in every run."""
    rng = np.random.default_rng(VALIDATION_SEED)
    classes = dataset.classes.numpy()
    val = []
    for d in range(10):
        idx = np.flatnonzero(classes == d)
        n = per_digit if per_digit is not None else max(1, int(round(frac * len(idx))))
        val.append(rng.permutation(idx)[:n])
    val = np.sort(np.concatenate(val))
    rest = np.setdiff1d(np.arange(len(dataset)), val)
    return dataset.subset(rest), dataset.subset(val)


def make_sequence(args: argparse.Namespace, seed: int):
    """The task sequence of one seed. Packaged digits: VALIDATION_PER_DIGIT images per digit are set
    aside once (validation); the seed splits the other 450 into 360 training and 90 test images per
    normal digit, and the test anomalies are the 450 non-validation zeros. With --validate the test
    normals and anomalies are replaced by the validation images. --mnist-root: train on the 60,000
    training digits, test on the 10,000 test digits; with --validate, VALIDATION_FRAC of the training
    digits are held out as the validation images and the rest train."""
    from anomalab.continual import mnist_digit_sequence
    from anomalab.data.mnist import load_mnist

    if args.mnist_root:
        train = load_mnist(args.mnist_root, "train")
        if not args.validate:
            return mnist_digit_sequence(train, seed=seed, test_dataset=load_mnist(args.mnist_root, "test"))
        rest, val = validation_split(train, frac=VALIDATION_FRAC)
        seq = mnist_digit_sequence(rest, seed=seed, test_dataset=val)
        seq.meta["split"] = "validation"
        return seq
    rest, val = validation_split(load_mnist(), per_digit=VALIDATION_PER_DIGIT)
    seq = mnist_digit_sequence(rest, test_frac=TEST_FRAC, seed=seed)
    if args.validate:
        vclasses = val.classes.numpy()
        seq.tests = [val.subset(np.flatnonzero(vclasses == int(d))) for d in seq.names]
        seq.anomalies = val.subset(np.flatnonzero(vclasses == seq.meta["anomaly_digit"]))
        seq.meta["split"] = "validation"
    return seq


def ink_auroc(args: argparse.Namespace, seed: int) -> list[float]:
    """AUROC after each task of a detector that learns nothing: score = mean(x^2), the reconstruction
    MSE of an all-black output. 0s carry more ink than most digits, so this is the floor to beat."""
    from anomalab.metrics import image_auroc

    seq = make_sequence(args, seed)
    out = []
    for i in range(len(seq)):
        test = seq.test_after(i)
        out.append(image_auroc(test.labels.numpy(), test.images.pow(2).flatten(1).mean(1).numpy()))
    return out


def strategy_params(name: str, args: argparse.Namespace) -> dict:
    if name == "ewc":
        return {"ewc_lambda": args.ewc_lambda, "fisher_samples": args.fisher_samples}
    if name == "replay":
        return {"replay_fraction": args.replay_fraction}
    if name == "joint":
        return {"equal_steps": args.joint == "equal-steps"}
    return {}


def run_cell(strategy: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """Learn the 9 tasks with one strategy and seed; evaluate after each task."""
    from anomalab.continual import ContinualLearner
    from anomalab.metrics import image_auroc
    from anomalab.registry import create

    seq = make_sequence(args, seed)
    digits = [int(n) for n in seq.names]
    # every test image once: held-out normals of each digit, then the anomalies
    pool = torch.cat([t.images for t in seq.tests] + [seq.anomalies.images])
    owner = np.concatenate([np.full(len(t), d) for t, d in zip(seq.tests, digits, strict=True)]
                           + [np.full(len(seq.anomalies), seq.meta["anomaly_digit"])])
    anomaly = owner == seq.meta["anomaly_digit"]
    detector = create("vae", latent_dim=args.latent_dim, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, seed=seed, arch=args.arch, error=args.error)
    detector.progress = False
    learner = ContinualLearner(detector, strategy, **strategy_params(strategy, args))
    auroc, digit_score, digit_auroc, samples, task_s = [], [], [], [], []
    # the first held-out image of every digit, reconstructed after the tasks of --show-after
    show = torch.stack([t.images[0] for t in seq.tests] + [seq.anomalies.images[0]])
    tag = "" if args.validate else f"_seed{seed}"
    for i, task in enumerate(seq.tasks):
        with Clock() as clock:
            learner.learn(task, name=seq.names[i])
        task_s.append(clock.wall_s)
        scores = detector.score(pool).numpy().astype(np.float64)
        seen = np.isin(owner, digits[: i + 1])
        keep = seen | anomaly
        auroc.append(image_auroc(anomaly[keep].astype(int), scores[keep]))
        digit_score.append({str(d): float(scores[owner == d].mean()) for d in [0, *digits]})
        digit_auroc.append({str(d): image_auroc(anomaly[(owner == d) | anomaly].astype(int),
                                                scores[(owner == d) | anomaly]) for d in digits})
        if i + 1 in args.show_after or i == len(seq) - 1:
            if not args.validate:
                np.save(out / f"recon_{strategy}{tag}_after{i + 1}.npy", detector.reconstruct(show).numpy())
        if strategy == "replay":
            # what the decoder at the end of task i decodes from z ~ N(0, I): the next task's replay
            samples.append(detector.sample(N_SHOW, generator=torch.Generator().manual_seed(seed)).numpy())
        log.info("%s seed %d after task %s: AUROC %.3f (%.1fs)", strategy, seed, seq.names[i], auroc[-1],
                 task_s[-1])
    if not args.validate:
        np.save(out / "recon_inputs.npy", show.numpy())
        if samples:
            np.save(out / f"samples_{strategy}{tag}.npy", np.stack(samples))
    decoder_bytes = sum(v.numel() * v.element_size() for v in detector.decoder_.state_dict().values())
    return {"strategy": strategy, "seed": seed, "settings": settings_key(args, strategy), "tasks": seq.names,
            "auroc": auroc, "digit_score": digit_score, "digit_auroc": digit_auroc,
            "memory_bytes": learner.memory_bytes, "decoder_bytes": decoder_bytes, "task_s": task_s,
            "n_train_per_task": [len(t) for t in seq.tasks],
            "n_test_normal_per_task": [len(t) for t in seq.tests],
            "n_anomalies": len(seq.anomalies), "split": seq.meta["split"],
            "score_error": args.error, "arch": args.arch}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    store = open_store(args.out, KEY)
    records = {}
    for seed in args.seeds:
        for strategy in args.strategies:
            key = {"strategy": strategy, "seed": seed, "settings": settings_key(args, strategy)}
            records[(strategy, seed)] = store.get(key) or store.add(run_cell(strategy, seed, args, args.out))
    ink = {seed: ink_auroc(args, seed) for seed in args.seeds}
    if args.validate:
        sys.stdout.write(write_table(args.out, validation_lines(list(store), ink), name="validation.md"))
        return records
    text = write_table(args.out, table_lines(records, ink, args))
    make_figures(records, ink, args, args.out)
    sys.stdout.write(text)
    return records


# ---- table -----------------------------------------------------------------------------------------
SWEPT = ("arch", "error", "latent_dim", "lr", "epochs", "ewc_lambda")  # settings the validation table shows


def choose_settings(rows: list[dict]) -> dict:
    """The selection rule on validation rows of the conv28/MSE VAE: (lr, latent_dim) with the highest mean,
    over joint, replay and finetune, of the mean AUROC over tasks (settings where all three ran); then the
    ewc_lambda with EWC's highest mean AUROC over tasks at that (lr, latent_dim). {} without candidates."""
    val = [r for r in rows if r["settings"].get("protocol") == "validation" and "arch" not in r["settings"]]
    combos: dict[tuple, dict[str, list[float]]] = {}
    for r in val:
        if r["strategy"] in ("joint", "replay", "finetune"):
            st = r["settings"]
            combos.setdefault((st["lr"], st["latent_dim"]), {}).setdefault(r["strategy"], []).append(
                float(np.mean(r["auroc"])))
    full = {k: float(np.mean([np.mean(v) for v in per.values()])) for k, per in combos.items() if len(per) == 3}
    if not full:
        return {}
    lr, z = max(full, key=full.get)
    out = {"lr": lr, "latent_dim": z, "score": full[(lr, z)], "candidates": len(full)}
    lams: dict[float, list[float]] = {}
    for r in val:
        if r["strategy"] == "ewc" and r["settings"]["lr"] == lr and r["settings"]["latent_dim"] == z:
            lams.setdefault(r["settings"]["ewc_lambda"], []).append(float(np.mean(r["auroc"])))
    if lams:
        lam = max(lams, key=lambda k: np.mean(lams[k]))
        out.update(ewc_lambda=lam, ewc_score=float(np.mean(lams[lam])))
    return out


def validation_lines(rows: list[dict], ink: dict[int, list[float]]) -> list[str]:
    """Every validation cell of the store: its settings, the AUROC after the last task and the mean over
    the tasks (the selection criterion), on the validation images only."""
    body = []
    for r in sorted(rows, key=lambda r: (r["settings"].get("arch", "conv28"), r["settings"]["lr"],
                                         r["settings"]["latent_dim"], r["strategy"],
                                         r["settings"].get("ewc_lambda", 0), r["seed"])):
        st = r["settings"]
        if st.get("protocol") != "validation":
            continue
        body.append([r["strategy"], r["seed"], *(st.get(k, "conv28" if k == "arch" else "mse" if k == "error"
                                                             else "") for k in SWEPT),
                     f"{r['auroc'][-1]:.3f}", f"{np.mean(r['auroc']):.3f}"])
    seeds = sorted(ink)
    floor = [f"ink floor (no training), seed {s}: final {ink[s][-1]:.3f}, mean over tasks {np.mean(ink[s]):.3f}"
             for s in seeds]
    chosen = choose_settings(rows)
    if chosen:
        floor += ["", f"Chosen: lr {chosen['lr']}, latent {chosen['latent_dim']} (mean over joint, replay and "
                  f"finetune of the mean AUROC over tasks: {chosen['score']:.4f}, over "
                  f"{chosen['candidates']} settings)"
                  + (f"; ewc_lambda {chosen['ewc_lambda']} (EWC's mean AUROC over tasks at that lr and latent: "
                     f"{chosen['ewc_score']:.4f})" if "ewc_lambda" in chosen else "") + "."]
    return ["Validation split (the same images for every seed, never trained or tested on by a reported "
            "seed): image AUROC of the validation normals of the digits seen so far vs the validation "
            "zeros.", "",
            *markdown_table(["strategy", "seed", *SWEPT, "final AUROC", "mean AUROC over tasks"], body), "",
            *floor]


def table_lines(records: dict, ink: dict[int, list[float]], args: argparse.Namespace) -> list[str]:
    strategies = [s for s in args.strategies if any(k[0] == s for k in records)]
    seeds = sorted({k[1] for k in records})
    tasks = next(iter(records.values()))["tasks"]

    def runs(s: str) -> list[dict]:
        return [records[(s, seed)] for seed in seeds if (s, seed) in records]

    per_task = [[s, *(mean_std(r["auroc"][i] for r in runs(s)) for i in range(len(tasks)))] for s in strategies]
    per_task.append(["ink (no training: score = mean x²)",
                     *(mean_std(ink[seed][i] for seed in seeds) for i in range(len(tasks)))])
    first = tasks[0]
    err = ERROR_NAMES[args.error]
    forgetting = []
    for s in strategies:
        recs = runs(s)
        drop = [np.mean([r["digit_auroc"][k][t] - r["digit_auroc"][-1][t] for k, t in enumerate(tasks[:-1])])
                for r in recs]
        learned = [np.mean([r["digit_score"][k][t] for k, t in enumerate(tasks)]) for r in recs]
        kept = [np.mean([r["digit_score"][-1][t] for t in tasks]) for r in recs]
        forgetting.append([s, mean_std(r["auroc"][-1] for r in recs),
                           mean_std(r["digit_auroc"][0][first] for r in recs),
                           mean_std(r["digit_auroc"][-1][first] for r in recs), mean_std(drop),
                           mean_std(learned, 4), mean_std(kept, 4),
                           f"{recs[0]['memory_bytes'][-1] / 1e6:.3f} MB ({STORED[s]})",
                           f"{np.mean([sum(r['task_s']) for r in recs]):.0f}"])
    return [f"Continual MNIST (digits {'..'.join([tasks[0], tasks[-1]])} in order, anomaly digit 0); seeds "
            f"{seeds}; {args.arch} VAE, score {args.error}, {args.epochs} epochs per task, batch "
            f"{args.batch_size}, lr {args.lr}, latent {args.latent_dim}, ewc_lambda {args.ewc_lambda}, joint "
            f"{args.joint}; image AUROC (held-out test normals of the digits seen so far vs the "
            f"{next(iter(records.values()))['n_anomalies']} test 0s), mean ± std over seeds.", "",
            *markdown_table(["strategy", *(f"after {t}" for t in tasks)], per_task), "",
            f"Forgetting: AUROC of digit {first} (the first task) vs digit 0, right after task 1 and "
            "after the last task, and the drop averaged over every earlier digit d (AUROC of d vs 0 right "
            f"after task d minus after the last task); reconstruction {err} (the score) of held-out digits: of "
            "each digit right after its task (learning) and of all normal digits after the last task (memory); memory "
            "kept while training the last task; training time per seed.", "",
            *markdown_table(["strategy", "final AUROC (all digits)", f"digit-{first} AUROC after task 1",
                             "after last task", "mean forgetting, earlier digits", f"{err} of digit d after task d",
                             f"{err} of digits 1-9 at the end", "memory kept", "train s / seed"], forgetting)]


# ---- figures ---------------------------------------------------------------------------------------
def make_figures(records: dict, ink: dict[int, list[float]], args: argparse.Namespace, out: Path) -> None:
    from anomalab.experiments._common import pyplot, save_figure
    from anomalab.report.plots import image_grid

    plt = pyplot()
    strategies = [s for s in args.strategies if any(k[0] == s for k in records)]
    seeds = sorted({k[1] for k in records})
    tasks = next(iter(records.values()))["tasks"]
    x = np.arange(1, len(tasks) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for s in strategies:
        a = np.array([records[(s, seed)]["auroc"] for seed in seeds if (s, seed) in records])
        ax.plot(x, a.mean(0), marker="o", ms=3, label=s)
        ax.fill_between(x, a.mean(0) - a.std(0), a.mean(0) + a.std(0), alpha=0.2)
    ax.plot(x, np.mean([ink[seed] for seed in seeds], axis=0), color="grey", ls="--", lw=1,
            label="ink (no training)")
    ax.set_xticks(x, [f"{t}" for t in tasks])
    ax.set_xlabel("after task (digit learned)")
    ax.set_ylabel("image AUROC (0 vs digits seen)")
    ax.set_title(f"continual MNIST, VAE z={args.latent_dim}, {len(seeds)} seeds (mean ± std)", fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    save_figure(fig, out / "auroc_vs_task.png")

    digits = ["0", *tasks]
    mats = {s: np.mean([[[row[d] for d in digits] for row in records[(s, seed)]["digit_score"]]
                        for seed in seeds if (s, seed) in records], axis=0) for s in strategies}
    vmax = max(m.max() for m in mats.values())
    fig, axes = plt.subplots(1, len(strategies), figsize=(3.3 * len(strategies), 3.4), squeeze=False)
    for ax, s in zip(axes[0], strategies, strict=True):
        im = ax.imshow(mats[s], cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(digits)), digits)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("evaluated digit (0 = anomaly)")
        ax.set_ylabel("after task")
        ax.set_title(s, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=f"mean reconstruction {ERROR_NAMES[args.error]}")
    save_figure(fig, out / "error_matrix.png")

    seed = seeds[0]
    sample_file = out / f"samples_replay_seed{seed}.npy"
    if sample_file.is_file():
        samples = torch.from_numpy(np.load(sample_file, allow_pickle=False))
        image_grid([(f"after {t}", samples[i]) for i, t in enumerate(tasks)], out / "replay_samples.png",
                   title=f"decoded from z ~ N(0, I) after each task (= replayed in the next), seed {seed}")
    inputs = out / "recon_inputs.npy"
    rows = [("input", torch.from_numpy(np.load(inputs, allow_pickle=False)))] if inputs.is_file() else []
    shown = sorted({*(t for t in args.show_after if 1 <= t <= len(tasks)), len(tasks)})
    for t in shown:
        for s in strategies:
            f = out / f"recon_{s}_seed{seed}_after{t}.npy"
            if f.is_file():
                rows.append((f"{s}\nafter {tasks[t - 1]}", torch.from_numpy(np.load(f, allow_pickle=False))))
    if len(rows) > 1:
        image_grid(rows, out / "reconstructions.png", col_titles=[*tasks, "0 (anomaly)"],
                   title=f"held-out digits reconstructed after tasks {', '.join(tasks[t - 1] for t in shown)}, "
                         f"seed {seed}")


if __name__ == "__main__":
    main()
