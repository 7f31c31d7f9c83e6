"""Continual learning for anomaly detection on MNIST (Wiewel & Yang 2019; docs/continual.md).

Tasks are digits 1..9 in order, digit 0 is the anomaly. The conv28 VAE (the 28x28 convolutional VAE of
docs/detectors/conv_ae_vae.md) learns the tasks one at a time with four strategies (joint = upper bound,
replay = generative replay of the source, ewc, finetune = lower bound); after each task it is evaluated
by image AUROC on held-out normals of the digits seen so far vs all images of digit 0. Writes
runs/continual_mnist/: results.jsonl (one row per strategy x seed x settings; a rerun skips them),
results.md, figures.

    anomalab experiment continual_mnist --seeds 0 1 2
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
LATENT_DIM = 8  # z of the conv28 VAE; 8 beat 32 and 64 in our pilot (docs/continual.md)
LR = 3e-3  # Adam (fresh per task); 1e-3 left the VAE's samples grey after 20 epochs
EWC_LAMBDA = 100.0  # chosen by a sweep over 0.01, 1, 100, 1e4 on seed 100 (docs/continual.md)
FISHER_SAMPLES = 200  # images per task for the diagonal Fisher
REPLAY_FRACTION = 0.5  # source: batch_size / 2 replayed images per step
TEST_FRAC = 0.2  # held-out share of each normal digit (100 of 500 in the packaged digits)
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
                   help="folder of the MNIST IDX files: train on the 60,000 training digits, test on the "
                        "10,000 test digits (default: the 5,000 packaged digits, 20%% held out)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def settings_key(args: argparse.Namespace, strategy: str) -> dict:
    """What a result depends on: shared settings and the strategy's own parameters."""
    return {"epochs": args.epochs, "batch_size": args.batch_size, "latent_dim": args.latent_dim,
            "lr": args.lr, "mnist_root": args.mnist_root, **strategy_params(strategy, args)}


def make_sequence(args: argparse.Namespace, seed: int):
    from anomalab.continual import mnist_digit_sequence
    from anomalab.data.mnist import load_mnist

    if args.mnist_root:
        return mnist_digit_sequence(load_mnist(args.mnist_root, "train"), seed=seed,
                                    test_dataset=load_mnist(args.mnist_root, "test"))
    return mnist_digit_sequence(load_mnist(), test_frac=TEST_FRAC, seed=seed)


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
                      lr=args.lr, seed=seed)
    detector.progress = False
    learner = ContinualLearner(detector, strategy, **strategy_params(strategy, args))
    auroc, digit_score, digit_auroc, samples, task_s = [], [], [], [], []
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
        if strategy == "replay":
            # what the decoder at the end of task i decodes from z ~ N(0, I): the next task's replay
            samples.append(detector.sample(N_SHOW, generator=torch.Generator().manual_seed(seed)).numpy())
        log.info("%s seed %d after task %s: AUROC %.3f (%.1fs)", strategy, seed, seq.names[i], auroc[-1],
                 task_s[-1])
    # reconstructions of the first held-out image of every digit at the end
    show = torch.stack([t.images[0] for t in seq.tests] + [seq.anomalies.images[0]])
    np.save(out / f"recon_{strategy}_seed{seed}.npy", detector.reconstruct(show).numpy())
    np.save(out / "recon_inputs.npy", show.numpy())
    if samples:
        np.save(out / f"samples_{strategy}_seed{seed}.npy", np.stack(samples))
    decoder_bytes = sum(v.numel() * v.element_size() for v in detector.decoder_.state_dict().values())
    return {"strategy": strategy, "seed": seed, "settings": settings_key(args, strategy), "tasks": seq.names,
            "auroc": auroc, "digit_score": digit_score, "digit_auroc": digit_auroc,
            "memory_bytes": learner.memory_bytes, "decoder_bytes": decoder_bytes, "task_s": task_s,
            "n_train_per_task": [len(t) for t in seq.tasks],
            "n_test_normal_per_task": [len(t) for t in seq.tests],
            "n_anomalies": len(seq.anomalies), "split": seq.meta["split"]}


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
    text = write_table(args.out, table_lines(records, ink, args))
    make_figures(records, ink, args, args.out)
    sys.stdout.write(text)
    return records


# ---- table -----------------------------------------------------------------------------------------
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
            f"{seeds}; {args.epochs} epochs per task, batch {args.batch_size}, lr {args.lr}, "
            f"latent {args.latent_dim}, ewc_lambda {args.ewc_lambda}, joint {args.joint}; image AUROC (held-out "
            "normals of the digits seen so far vs all 0s), mean ± std over seeds.", "",
            *markdown_table(["strategy", *(f"after {t}" for t in tasks)], per_task), "",
            f"Forgetting: AUROC of digit {first} (the first task) vs digit 0, right after task 1 and "
            "after the last task, and the drop averaged over every earlier digit d (AUROC of d vs 0 right "
            "after task d minus after the last task); reconstruction MSE of held-out digits: of each digit "
            "right after its task (learning) and of all normal digits after the last task (memory); memory "
            "kept while training the last task; training time per seed.", "",
            *markdown_table(["strategy", "final AUROC (all digits)", f"digit-{first} AUROC after task 1",
                             "after last task", "mean forgetting, earlier digits", "MSE of digit d after task d",
                             "MSE of digits 1-9 at the end", "memory kept", "train s / seed"], forgetting)]


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
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean reconstruction MSE")
    save_figure(fig, out / "error_matrix.png")

    seed = seeds[0]
    sample_file = out / f"samples_replay_seed{seed}.npy"
    if sample_file.is_file():
        samples = torch.from_numpy(np.load(sample_file, allow_pickle=False))
        image_grid([(f"after {t}", samples[i]) for i, t in enumerate(tasks)], out / "replay_samples.png",
                   title=f"decoded from z ~ N(0, I) after each task (= replayed in the next), seed {seed}")
    inputs = out / "recon_inputs.npy"
    rows = [("input", torch.from_numpy(np.load(inputs, allow_pickle=False)))] if inputs.is_file() else []
    for s in strategies:
        f = out / f"recon_{s}_seed{seed}.npy"
        if f.is_file():
            rows.append((s, torch.from_numpy(np.load(f, allow_pickle=False))))
    if len(rows) > 1:
        image_grid(rows, out / "reconstructions.png", col_titles=[*tasks, "0 (anomaly)"],
                   title=f"held-out digits reconstructed after the last task, seed {seed}")


if __name__ == "__main__":
    main()
