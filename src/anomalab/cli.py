"""The `anomalab` command line. Every command has --help.

Errors: a mistake of the user (a `UserError`: bad value, path, file, existing output) is one line on stderr
and exit code 2; anything else is a bug in anomalab: one line saying so (the traceback with `-v`), exit 1.
Every command that writes files follows one rule (anomalab.runs.outputs): never overwrite without
--overwrite, never write into its own input, never delete what it did not create.
"""

from __future__ import annotations

import os

# Passive OpenMP waiting, set before torch loads: a busy-waiting torch loop next to another job can run
# 10-100x slower. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import pkgutil  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402
from click.core import ParameterSource  # noqa: E402

from anomalab.errors import UserError  # noqa: E402

# OS errors about paths are the user's too (a missing file, a folder without write permission)
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


class Group(click.Group):
    """Mistakes -> one line, exit 2; Ctrl-C -> exit 130; anything else -> a bug report line, exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise  # click's own flow (--help, usage errors): it prints and exits itself
        except (UserError, *PATH_ERRORS) as e:
            dist = sys.modules.get("anomalab.distributed")  # loaded where ranks run (no torch import here)
            if dist is None or not isinstance(e, dist.DistributedError):  # under torchrun: printed by the failing rank
                click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written for the unfinished step", err=True)
            sys.exit(130)
        except Exception as e:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: this is a bug in anomalab ({type(e).__name__}: {e}); "
                       "run again with -v for the traceback and report it", err=True)
            sys.exit(1)
        finally:
            if "anomalab.distributed" in sys.modules:
                sys.modules["anomalab.distributed"].shutdown()


def _command_line() -> str:
    return "anomalab " + " ".join(sys.argv[1:])


def _echo_calibration(run: Path) -> None:
    """What the run's threshold rests on, and its calibration warnings (on stderr)."""
    from anomalab.thresholds import read_calibration

    record = read_calibration(run)
    if record is None:
        return
    pixel = record["threshold"].get("pixel_value")
    click.echo(f"threshold: {record['how']}" + (f"; pixel threshold {pixel:.5g}" if pixel is not None else ""))
    for note in record.get("notes", []):
        click.echo(f"note: {note}", err=True)
    for warning in record.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's choice).")
@click.option("-v", "--verbose", is_flag=True, help="log more; show the traceback of a bug.")
@click.version_option(package_name="anomalab")
@click.pass_context
def main(ctx, threads: int | None, verbose: bool) -> None:
    """anomalab: learn normal images, score and localise anomalies, generate pseudo-anomalies."""
    ctx.obj = {"verbose": verbose}
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    for name in ("anomalab.progress", "anomalab.train.epochs"):  # progress lines off a terminal; longer training
        logging.getLogger(name).setLevel(logging.INFO)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if os.environ.get("RANK") is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _join_torchrun(ctx.invoked_subcommand)


def _join_torchrun(command: str | None) -> None:
    """Under torchrun (several ranks): refuse, in one line, the commands that do not run distributed; else join
    the process group, with the logs of ranks other than 0 kept to errors (docs/distributed.md)."""
    from anomalab import distributed
    from anomalab.errors import NotSupportedError

    if command not in distributed.DISTRIBUTED_COMMANDS:
        hint = ("; split it over processes with --shard K/N instead" if command == "predict" else "")
        runs = " and ".join(f"`anomalab {c}`" for c in distributed.DISTRIBUTED_COMMANDS)
        error = NotSupportedError(f"`anomalab {command}` does not run under torchrun ({runs} do){hint}")
        if int(os.environ["RANK"]) != 0:
            raise distributed.DistributedError(f"rank 0: {error}")
        raise error
    distributed.init()
    if distributed.rank() != 0:
        logging.getLogger().setLevel(logging.ERROR)
        for name in ("anomalab.progress", "anomalab.train.epochs"):
            logging.getLogger(name).setLevel(logging.ERROR)


@main.command("list")
def list_cmd() -> None:
    """List the detectors and their parameters (defaults)."""
    from anomalab.registry import describe, list_detectors

    for name in list_detectors():
        doc, defaults = describe(name)  # read from the source: nothing is imported
        doc = _whole_sentence(doc)
        params = ", ".join(f"{p}={v!r}" for p, v in defaults.items())
        click.echo(f"{name:15s} {doc}\n{'':15s} {params}")


def recommendation() -> str:
    """Which detector to start with, by kind of image (what `anomalab fit` without DETECTOR prints)."""
    from anomalab.registry import REGISTRY

    lines = ["Which detector? Start with the one for your kind of images (`anomalab list` shows them all):",
             "  photos of parts, surfaces or textures (gray or colour, any size):",
             "    gaussian    pretrained ImageNet features and one Gaussian: nothing is trained, a few minutes on a "
             "CPU, anomaly maps"]
    if "patchcore" in REGISTRY:
        lines.append("    patchcore   pretrained patch features and nearest neighbours in a bank of normal patches")
    lines += ["  digit-like images (small, centred, gray, such as MNIST digits or dSprites shapes):",
              "    vae         a small convolutional VAE trained on your images (at least 500 optimisation steps)",
              "    knn         nearest neighbours on raw pixels: the baseline any detector should beat",
              "e.g. anomalab fit gaussian --data DIR --out runs/first"]
    return "\n".join(lines)


def _detector_or_recommendation(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`anomalab fit` without DETECTOR: print the recommendation, a one-line hint, exit 2 (before the other
    arguments are checked)."""
    if value is None and not ctx.resilient_parsing:
        click.echo(recommendation())
        click.echo("error: name a DETECTOR, e.g. anomalab fit gaussian --data DIR --out RUN_DIR", err=True)
        ctx.exit(2)
    return value


@main.command()
@click.argument("detector", required=False, callback=_detector_or_recommendation)
@click.argument("params", nargs=-1)
@click.option("--data", "data", required=True,
              help="data spec: mnist:anomaly=0, textures:brick, or a folder.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="run folder to write.")
@click.option("--max-fpr", default=0.01, show_default=True, type=float,
              help="threshold: FPR allowed on held-out normals, in [0, 1).")
@click.option("--calib-frac", default=0.1, show_default=True, type=float,
              help="share of normal training images held out to fit the threshold, in [0, 1).")
@click.option("--calib-folds", "calib_folds", default=None, type=click.IntRange(min=0),
              help="cross-fitting: K folds, each training image scored for the threshold by a detector fitted "
                   "without it (the saved detector is fitted on all); 0 = hold out --calib-frac instead. Default: "
                   "5 folds for knn, pca, gaussian, patchcore, padim on fewer than 200 images, else the hold-out.")
@click.option("--overwrite", is_flag=True, help="replace an existing run folder (only a run folder; only once the "
                                                "new run has succeeded).")
@click.option("--no-figures", is_flag=True, help="skip PNG figures.")
@click.option("--continue-from", "continue_from", default=None, type=click.Path(exists=True, file_okay=False),
              help="continual learning: update the detector saved in this run with --data as a new task "
                   "and write --out as a new run (this run is only read). See docs/continual.md.")
@click.option("--strategy", type=click.Choice(["finetune", "replay", "ewc", "joint"]), default=None,
              help="with --continue-from: how to keep earlier tasks (default: the old run's, else replay).")
@click.option("--tile", type=int, default=None, metavar="PIXELS",
              help="fit and score on overlapping PIXELS x PIXELS tiles of the full-resolution images (image score: "
                   "max over the tiles; maps stitched at the image's own size). The run keeps it. See docs/tiling.md.")
@click.option("--overlap", type=int, default=0, show_default=True, metavar="PIXELS",
              help="with --tile: pixels shared by neighbouring tiles, in [0, tile).")
def fit(detector, params, data, out, max_fpr, calib_frac, calib_folds, overwrite, no_figures, continue_from,
        strategy, tile, overlap) -> None:
    """Fit DETECTOR on the normal images of --data and write a run folder.

    PARAMS are detector parameters as key=value, e.g. `anomalab fit vae --data mnist:anomaly=0
    --out runs/vae0 epochs=10 latent_dim=32`. With --continue-from, PARAMS may set epochs, lr,
    batch_size and the strategy's parameters (e.g. ewc_lambda=0.01). Every value is checked before
    anything is read or written; the run folder appears only when the whole run has succeeded.
    Without DETECTOR, prints which detector suits which images.
    """
    from anomalab.errors import ParameterError
    from anomalab.params import parse_items
    from anomalab.runs import continue_run, fit_run

    values = parse_items(params, what="detector parameter")
    if strategy and not continue_from:
        raise ParameterError("--strategy needs --continue-from RUN_DIR (the run to update)")
    if continue_from and (tile is not None or overlap):
        raise ParameterError("--tile/--overlap cannot be given with --continue-from (continual learning does not "
                             "support tiled runs)")
    frac_given = click.get_current_context().get_parameter_source("calib_frac") == ParameterSource.COMMANDLINE
    if calib_folds is not None and calib_folds >= 2 and (frac_given or continue_from):
        raise ParameterError("--calib-folds cross-fits the threshold on every training image; give it without "
                             + ("--continue-from (an update holds out --calib-frac)" if continue_from
                                else "--calib-frac"))
    if calib_folds is None and frac_given:
        calib_folds = 0  # the hold-out share asked for
    if continue_from:
        det, ev, run = continue_run(detector, values, data, out, continue_from, strategy, max_fpr=max_fpr,
                                    calib_frac=calib_frac, overwrite=overwrite, command=_command_line(),
                                    figures=not no_figures)
    else:
        det, ev, run = fit_run(detector, values, data, out, max_fpr=max_fpr, calib_frac=calib_frac,
                               calib_folds=calib_folds, overwrite=overwrite, command=_command_line(),
                               figures=not no_figures, tile=tile, overlap=overlap)
        if run is None:  # a rank other than 0 under torchrun: rank 0 writes and reports
            return
    click.echo(f"fitted {detector} -> {run}/detector "
               f"(threshold {det.threshold_.value:.5g} at max FPR {max_fpr})")
    _echo_calibration(run)
    if ev is not None:
        click.echo("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.metrics.items()))
    click.echo(f"report: {run / 'report.html'}")


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

    Each file is read at its own size and brought to the detector's input size on its own, so a file's
    score does not depend on the other files; files are scored in chunks (bounded memory), and
    `--shard 0/4` ... `--shard 3/4` split them over four processes whose outputs join to the full result.
    Run by torchrun on N processes, the N ranks score disjoint shards and rank 0 writes the merged result,
    in the input order (docs/distributed.md)."""
    from anomalab import distributed, scoring
    from anomalab.registry import load
    from anomalab.runs.atomic import write_file_atomic
    from anomalab.runs.outputs import check_output_file

    def checked():
        if out and distributed.rank() == 0:
            check_output_file(out, overwrite=overwrite, inputs=[run_dir, *images])
        return load(run_dir), scoring.shard(scoring.collect_files(images), shard)

    det, files = distributed.agree(checked)
    rows = scoring.merged_rows(det, files, on_error="raise" if strict else "skip")
    if rows is None:  # a rank other than 0 under torchrun: rank 0 writes
        return
    text = scoring.format_rows(rows, fmt, det.threshold_)
    if out:
        write_file_atomic(out, text)
    else:
        click.echo(text, nl=False)


@main.command("predict")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="folder to write (new; or one predict wrote, with --overwrite).")
@click.option("--format", "fmt", type=click.Choice(["png", "jpg"]), default="png", show_default=True,
              help="overlay image format (masks are always PNG).")
@click.option("--overwrite", is_flag=True, help="replace a folder predict wrote before (never another).")
@click.option("--strict", is_flag=True, help="fail on an unreadable file instead of skipping it.")
@click.option("--shard", default=None, metavar="K/N",
              help="predict only every N-th file starting at K (0-based); the N outputs never share a file name.")
def predict_cmd(run_dir, images, out, fmt, overwrite, strict, shard) -> None:
    """Verdicts a person can see for IMAGES (files or folders) with the detector saved in RUN_DIR.

    Writes to --out: predictions.csv (name, path, score, verdict, threshold; scores as `anomalab score`
    gives them), per image an overlay of its anomaly map on the run's threshold-anchored colour scale and a
    defect mask (map above the pixel threshold), and index.html, a gallery sorted by score and filterable by
    verdict. Streams any number of files; the folder appears only when complete."""
    from anomalab.predict import predict

    summary = predict(run_dir, images, out, fmt=fmt, overwrite=overwrite, strict=strict, shard=shard)
    for note in summary["notes"]:
        click.echo(f"note: {note}", err=True)
    skipped = f", {summary['n_skipped']} unreadable skipped" if summary["n_skipped"] else ""
    click.echo(f"predicted {summary['n_images']} images: {summary['n_anomalous']} anomalous (score above "
               f"{summary['threshold']['value']:.5g}){skipped} -> {out}")
    click.echo(f"gallery: {Path(out) / 'index.html'}")


@main.command("threshold")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--max-fpr", type=float, default=None,
              help="re-pick at this false-positive rate from the run's kept normal scores (or from --normal).")
@click.option("--normal", multiple=True, type=click.Path(exists=True),
              help="normal images (a folder or files; repeatable) to score and pick from, at --max-fpr (default: "
                   "the current rate); they become the run's kept normal scores.")
@click.option("--value", type=float, default=None, help="set the image threshold by hand.")
@click.option("--pixel-value", type=float, default=None,
              help="set the pixel threshold (masks: map above it) by hand.")
def threshold_cmd(run_dir, max_fpr, normal, value, pixel_value) -> None:
    """Re-pick the thresholds of the run in RUN_DIR without refitting.

    The detector, its weights and all scores stay as they are; the new threshold and how it was set
    (method, the number of normal scores it rests on, date) are written to detector/detector.json and
    calibration.json (the old one kept in its history), the test-set verdicts of evaluation.json and
    report.html follow it. Figures keep the threshold of the fit."""
    from anomalab.thresholds import retune

    result = retune(run_dir, max_fpr=max_fpr, normal=list(normal) or None, value=value, pixel_value=pixel_value)
    new, old = result["threshold"], result["previous"]
    was = f" (was {old.value:.5g})" if old is not None else ""
    click.echo(f"threshold {new.value:.5g}{was}: {result['record']['how']}")
    if new.pixel_value is not None or (old is not None and old.pixel_value is not None):
        before = f" (was {old.pixel_value:.5g})" if old is not None and old.pixel_value is not None else ""
        now = "none" if new.pixel_value is None else f"{new.pixel_value:.5g}"
        click.echo(f"pixel threshold {now}{before}")
    metrics = result["metrics"]
    if metrics:
        click.echo("test set at the new threshold: " + ", ".join(
            f"{'false' if k.startswith('fpr') else 'true'}-positive rate {100 * v:.1f} %" for k, v in metrics.items()))
    click.echo("rewrote: " + ", ".join(str(Path(p).relative_to(run_dir)) for p in result["changed"]))
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)


@main.command("evaluate")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data", required=True, help="data spec whose test set to evaluate on.")
@click.option("--normalize", type=click.Choice(["minmax"]), default=None,
              help="papers' test-set min-max scaling of scores (AUROC/AUPR unchanged).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the Evaluation JSON here.")
@click.option("--overwrite", is_flag=True, help="replace an existing --out file.")
def evaluate_cmd(run_dir, data, normalize, out, overwrite) -> None:
    """Evaluate the detector saved in RUN_DIR on the test set of --data; print the metrics."""
    from anomalab.data.specs import check_spec, inputs_of, load_spec
    from anomalab.errors import DataError
    from anomalab.evaluation import evaluate
    from anomalab.registry import load
    from anomalab.runs.atomic import write_file_atomic
    from anomalab.runs.outputs import check_output_file

    check_spec(data)
    if out:
        check_output_file(out, overwrite=overwrite, inputs=[run_dir, *inputs_of(data)])
    det = load(run_dir)
    _, test, info = load_spec(data)
    if test is None:
        raise DataError(f"data spec {data!r} has no test set (labels) to evaluate on")
    ev = evaluate(det, test, normalize=normalize, dataset=info["name"])
    for k, v in ev.metrics.items():
        click.echo(f"{k}\t{v:.4f}")
    if out:
        write_file_atomic(out, json.dumps(ev.to_dict(), indent=1))
        click.echo(f"evaluation: {out}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="HTML file (default: RUN_DIR/report.html, the run's own page, for one run; report.html for "
                   "several).")
@click.option("--title", default="anomalab report")
@click.option("--overwrite", is_flag=True, help="replace an existing --out file.")
def report(run_dirs, out, title, overwrite) -> None:
    """Build one self-contained HTML page from run folders (their JSON records and figures).

    With one run and no --out, the run's own report.html is rebuilt in place; any other existing file is
    replaced only with --overwrite."""
    from anomalab.report.html import write_report
    from anomalab.runs import RunFolder
    from anomalab.runs.outputs import check_output_file

    runs = [RunFolder(r) for r in run_dirs]  # each must be a complete run folder
    own_page = out is None and len(runs) == 1
    out = Path(out) if out else (runs[0].path / "report.html" if own_page else Path("report.html"))
    if not own_page:
        check_output_file(out, overwrite=overwrite, inputs=[r.path for r in runs])
    click.echo(f"report: {write_report([r.path for r in runs], out, title=title)}")


@main.command()
@click.argument("more_seeds", nargs=-1, metavar="")
@click.option("--data", "data", multiple=True, required=True,
              help="data spec with a test set (repeat for several categories): mnist:anomaly=0, textures:brick, an "
                   "MVTec-layout folder.")
@click.option("--detectors", default=None, help="comma-separated detectors (knn and pca are always added).")
@click.option("--family", type=click.Choice(["features", "gan", "ae", "all"]), default=None,
              help="the registered detectors of one family (default: all).")
@click.option("--budget", type=click.Choice(["quick", "standard", "paper"]), default="standard", show_default=True,
              help="quick: minutes for a first look; standard: the detectors' defaults; paper: the papers' schedules.")
@click.option("--seeds", "seeds", multiple=True, metavar="S [S ...]",
              help="seeds, e.g. --seeds 0 1 2 (default: 0 for quick, else 0 1 2); deterministic detectors are "
                   "fitted once.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="comparison folder: new, or one compare wrote (then it continues where it stopped).")
@click.option("--overwrite", is_flag=True, help="start over: replace a folder compare wrote (never another).")
@click.option("--refit", is_flag=True, help="fit every cell again, even those already finished.")
@click.option("--retry-failed", is_flag=True, help="fit the cells that failed before again.")
@click.option("--refit-stale", is_flag=True,
              help="fit again the finished cells whose detector was fitted with other parameters than this "
                   "version's (a default that changed).")
@click.option("--min-speed", default=20.0, show_default=True, type=float,
              help="speed budget of the recommendation: test images scored per second.")
@click.option("--no-figures", is_flag=True, help="skip the runs' PNG figures (their reports keep the tables).")
@click.option("--in-process", is_flag=True, help="run every cell in this process (faster start, no peak memory).")
def compare(more_seeds, data, detectors, family, budget, seeds, out, overwrite, refit, retry_failed, refit_stale,
            min_speed, no_figures, in_process) -> None:
    """Fit every detector on the normal images of each --data, evaluate on its test set, and write one
    leaderboard: OUT/leaderboard.html (self-contained), .json, .csv, .md; each run's folder, with its own
    report, under OUT/runs/<data>/<detector>_s<seed>/. Rerunning the same command continues an interrupted
    comparison; a cell that fails is recorded with its error and the others go on. See docs/compare.md."""
    from anomalab.compare import compare as run_compare
    from anomalab.errors import ParameterError

    if more_seeds and not seeds:
        raise ParameterError(f"unexpected argument {more_seeds[0]!r} (seeds follow --seeds: --seeds 0 1 2)")
    values = []
    for item in (*seeds, *more_seeds):
        for part in filter(None, item.replace(",", " ").split()):
            if not part.isdigit():
                raise ParameterError(f"--seeds takes integers >= 0, got {part!r}")
            values.append(int(part))
    board = run_compare(list(data), out, detectors=detectors, family=family, budget=budget,
                        seeds=values or None, overwrite=overwrite, refit=refit, retry_failed=retry_failed,
                        refit_stale=refit_stale, figures=not no_figures, isolate=not in_process,
                        min_images_per_s=min_speed, command=_command_line(),
                        echo=lambda line: click.echo(line, err=True))
    click.echo(board["recommendation"]["text"])
    if board["failed"]:
        click.echo(f"{board['failed']} of {board['cells']} cells failed (errors in the table)", err=True)
    click.echo(f"leaderboard: {Path(out) / 'leaderboard.html'}")


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write (model.onnx).")
@click.option("--overwrite", is_flag=True, help="replace an existing file.")
def export_cmd(run_dir, out, overwrite) -> None:
    """Export the scoring of the detector saved in RUN_DIR to ONNX (scores, and maps where the map is a fixed
    graph). The model carries its own metadata (name, version, input shape, threshold), also written beside
    it (model.onnx.json); run it with onnxruntime via anomalab.export.OnnxScorer. Needs `pip install
    anomalab[onnx]`."""
    from anomalab.export import export_onnx, meta_path
    from anomalab.registry import load
    from anomalab.runs.outputs import check_output_file

    check_output_file(out, overwrite=overwrite, inputs=[run_dir])
    check_output_file(meta_path(out), overwrite=overwrite, inputs=[run_dir])
    click.echo(f"onnx: {export_onnx(load(run_dir), out)}")


@main.group("make-dataset")
def make_dataset() -> None:
    """Build a dataset on disk in the MVTec AD layout."""


@make_dataset.command("textures")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write.")
@click.option("--categories", default="brick,grass,gravel", show_default=True, help="comma-separated photos.")
@click.option("--size", default=128, show_default=True, type=click.IntRange(min=8),
              help="side of the written images (px).")
@click.option("--n-train", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--n-test-good", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--n-test-per-defect", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--overwrite", is_flag=True, help="replace category folders this command wrote before (never others).")
def make_textures_cmd(out, categories, size, n_train, n_test_good, n_test_per_defect, seed, overwrite) -> None:
    """Texture benchmark from scikit-image's real photos (brick, grass, gravel): defect-free crops for
    training; test crops with synthetic scratches, blobs, missing patches and intensity shifts, with masks."""
    from anomalab.data.textures import make_textures

    cats = tuple(c.strip() for c in categories.split(",") if c.strip())
    root = make_textures(out, categories=cats, size=size, n_train=n_train, n_test_good=n_test_good,
                         n_test_per_defect=n_test_per_defect, seed=seed, overwrite=overwrite)
    for c in cats:
        click.echo(f"{root / c}: use it as --data {root / c}")


@make_dataset.command("strided")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write <category>_strided in.")
@click.option("--category", default="brick", show_default=True, type=click.Choice(["brick", "grass", "gravel"]),
              help="scikit-image photo.")
@click.option("--crop", default=128, show_default=True, type=click.IntRange(min=8), help="window side (px).")
@click.option("--train-stride", default=16, show_default=True, type=click.IntRange(min=1),
              help="grid step of the training windows (top half).")
@click.option("--test-stride", default=32, show_default=True, type=click.IntRange(min=1),
              help="grid step of the test windows (bottom half).")
@click.option("--defects", default="scratch,blob", show_default=True,
              help="comma-separated defect kinds, given in turn to the defective test windows.")
@click.option("--defective-fraction", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True,
              max_open=True), help="share of the test windows that get a defect (seeded).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--overwrite", is_flag=True, help="replace a folder this command wrote before (never another).")
def make_strided_cmd(out, category, crop, train_stride, test_stride, defects, defective_fraction, seed,
                     overwrite) -> None:
    """Strided split of one texture photo: every window of the top half on a fine grid for training (brick:
    225 crops of 128 px), every window of the bottom half on a coarser grid for testing (65), half of them
    given a synthetic scratch or blob with its mask."""
    from anomalab.data.textures import make_strided

    kinds = tuple(k.strip() for k in defects.split(",") if k.strip())
    root = make_strided(out, category=category, crop=crop, train_stride=train_stride, test_stride=test_stride,
                        defects=kinds, defective_fraction=defective_fraction, seed=seed, overwrite=overwrite)
    click.echo(f"{root}: use it as --data {root}")


DEFECT_KINDS = ("scratch", "blob", "missing_patch", "intensity_shift")  # anomalab.data.make_defects.KINDS


@main.command("make-defects")
@click.argument("images", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--kind", "kinds", multiple=True, required=True, type=click.Choice(DEFECT_KINDS),
              help="defect to paint; repeat for several kinds (each gets its own test/<kind>/ folder).")
@click.option("--n", "n", required=True, type=click.IntRange(min=1),
              help="good images held out: the good test images, each also painted once with every --kind.")
@click.option("--degree", default=1.0, show_default=True, type=click.FloatRange(0, 1),
              help="defect strength: 0 = invisible, 1 = full; the same --seed places the same defects at every "
                   "degree.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="new folder to write (MVTec layout).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="which images are held out and which defects they get.")
@click.option("--overwrite", is_flag=True, help="replace a folder this command wrote before (make_defects.json; "
                                                "never another).")
def make_defects_cmd(images, kinds, n, degree, out, seed, overwrite) -> None:
    """Build a labelled test set from the good images in DIR: --n of them are held out and painted with
    synthetic defects (with masks), the rest are copied to train/good. `anomalab fit` on the written folder
    then trains on train/good and reports the AUROC on test/; folders of several --degree values show how
    strong a defect must be to be caught."""
    from anomalab.data.make_defects import make_defects

    record = make_defects(images, out, kinds=kinds, n=n, degree=degree, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {out}: {record['n_train']} training images (train/good), {n} good test images, "
               f"{n} per defect kind ({', '.join(kinds)}) with masks, degree {degree:g}")
    click.echo(f"next: anomalab fit gaussian --data {out} --out runs/{Path(out).name}-gaussian")


GENERATED_MARKER = "generate.json"


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="folder of normal images to start from.")
@click.option("--degree", default=0.5, show_default=True, type=float,
              help="strength of the added feature, 0 (as the normal images) to 1 (the strongest level the model "
                   "was trained on), mapped linearly onto the added latent dimension's trained range.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="new folder to write PNGs into.")
@click.option("--overwrite", is_flag=True, help="replace a folder this command wrote before (never another).")
def generate(run_dir, images, degree, out, overwrite) -> None:
    """Generate pseudo-anomalies of a chosen --degree from the normal images in --images with the beta-VAEGAN
    saved in RUN_DIR."""
    from anomalab.generate.beta_vaegan.generate import generate_folder, load_generator
    from anomalab.runs.atomic import staged_dir
    from anomalab.runs.outputs import check_output_dir

    check_output_dir(out, overwrite=overwrite, inputs=[images, run_dir],
                     replaceable=lambda p: (p / GENERATED_MARKER).is_file(), what="generate output")
    load_generator(run_dir).degree_code(degree)  # a bad --degree or an old model: one line, nothing written
    with staged_dir(out) as tmp:
        paths, own, info = generate_folder(run_dir, images, degree, tmp)
        (tmp / GENERATED_MARKER).write_text(json.dumps(
            {"run": str(run_dir), "images": str(images), "degree": degree, **info,
             "files": [p.name for p in paths]}, indent=1))
    lo, hi = info["range"]
    click.echo(f"wrote {len(paths)} images to {out}: degree {degree:g} = {info['code']:.2f} on the added dim (degree "
               f"0 = {lo:.2f}, where the normal images sit; 1 = {hi:.2f}, the strongest trained level); the input "
               f"images' own codes on it: mean {own.mean():.2f}, range {own.min():.2f} .. {own.max():.2f}")


def _experiments() -> list[str]:
    import anomalab.experiments as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _whole_sentence(paragraph: str) -> str:
    """`paragraph` on one line, ending at a whole sentence: one that stops mid-sentence (no final '.', '!'
    or '?', e.g. a colon before a list) is cut back to its last whole sentence, or, with none, closed with
    a full stop."""
    text = " ".join(paragraph.split())
    if not text or text[-1] in ".!?":
        return text
    ends = [i for i, ch in enumerate(text[:-1]) if ch in ".!?" and text[i + 1] == " "]
    return text[: ends[-1] + 1] if ends else text.rstrip(":;, ") + "."


def _experiment_doc(name: str) -> str:
    """First paragraph of an experiment's module docstring as a whole sentence (`_whole_sentence`), read
    from its source (nothing is imported)."""
    import ast

    import anomalab.experiments as pkg

    source = Path(pkg.__path__[0]) / f"{name}.py"
    doc = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8")), clean=False) or ""
    return _whole_sentence(doc.strip().split("\n\n")[0])


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.argument("name", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def experiment(name, args) -> None:
    """Run experiment NAME (one figure/table of the methods); ARGS go to it (`NAME --help` shows them).
    Without NAME (or with --help), list the experiments."""
    from anomalab.params import choose

    names = _experiments()
    if not name or name in ("--help", "-h"):
        click.echo("Usage: anomalab experiment NAME [ARGS]...   (anomalab experiment NAME --help for its options)\n")
        for n in names:
            doc = _experiment_doc(n)
            click.echo(f"{n:28s} {' '.join(doc.split())}")
        return
    choose(name, names, "experiment")
    importlib.import_module(f"anomalab.experiments.{name}").main(list(args))


DEMO_DETECTORS = ("patchcore", "padim", "gaussian", "knn", "pca")


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="run folder to write.")
@click.option("--predictions", default=None, type=click.Path(file_okay=False),
              help="predict folder to write (default: OUT-predictions).")
@click.option("--detector", default="patchcore", show_default=True, type=click.Choice(DEMO_DETECTORS))
@click.option("--category", default="brick", show_default=True, type=click.Choice(["brick", "grass", "gravel"]),
              help="which scikit-image photo the good crops come from.")
@click.option("--overwrite", is_flag=True, help="replace an earlier demo run and its predictions (only folders "
                                                "anomalab wrote).")
def demo(out, predictions, detector, category, overwrite) -> None:
    """The path of a user with a folder of good photos, on data that ships with the install: 100 crops of
    one of scikit-image's photos stand for the folder of good images; `make-defects` holds 20 of them out
    and paints synthetic scratches, blobs, missing patches and intensity shifts (with masks) on them; the
    best detector on photos is fitted on the other 80 with its threshold from normal images only; every
    test image gets a verdict, a heat-map overlay and a defect mask; the report says how many were caught
    and how many false alarms; beside it the raw-pixel kNN baseline on the same split."""
    from anomalab.data.make_defects import make_defects
    from anomalab.data.specs import DEFAULT_TEXTURES_ROOT
    from anomalab.data.textures import make_textures
    from anomalab.evaluation import evaluate
    from anomalab.predict import is_predict_folder, predict
    from anomalab.registry import create
    from anomalab.runs import fit_run
    from anomalab.runs.folder import is_run
    from anomalab.runs.outputs import check_output_dir

    predictions = Path(predictions) if predictions else Path(f"{out}-predictions")
    check_output_dir(out, overwrite=overwrite, replaceable=is_run, what="run folder")  # both refused up front
    check_output_dir(predictions, overwrite=overwrite, replaceable=is_predict_folder, what="predict folder")
    root = Path(DEFAULT_TEXTURES_ROOT)
    if not (root / category / "train" / "good").is_dir():
        make_textures(root, categories=(category,))
    good = root / category / "train" / "good"
    data = root.parent / f"demo-{category}"
    make_defects(good, data, n=20, seed=0, overwrite=True)  # replaces only a folder make-defects wrote
    click.echo(f"demo: the {len(list(good.iterdir()))} good crops of the {category} photo in {good} stand for your "
               f"folder of good images; `anomalab make-defects` built {data} from them (20 held out, each also "
               f"given a synthetic defect of every kind); fitting {detector} on the rest")
    det, ev, run = fit_run(detector, {}, str(data), out, overwrite=overwrite, command=_command_line())
    from anomalab.data.specs import load_spec

    train, test, _ = load_spec(str(data))
    knn = evaluate(create("knn", k=5).fit(train), test).metrics["image_auroc"]
    m, counts = ev.metrics, ev.extra.get("counts", {})
    verdict = "beats" if m["image_auroc"] > knn else "loses to"
    click.echo(f"image AUROC {m['image_auroc']:.3f}, pixel AUROC {m.get('pixel_auroc', float('nan')):.3f} "
               f"(the {detector} {verdict} the raw-pixel kNN baseline on the same split: image AUROC {knn:.3f})")
    if counts:
        n_good = counts["false_alarms"] + counts["passed"]
        click.echo(f"at the threshold {det.threshold_.value:.4g} (fitted on normal images only): "
                   f"{counts['caught']} defective images caught, {counts['missed']} missed, "
                   f"{counts['false_alarms']} false alarms among {n_good} good images")
    summary = predict(run, sorted(p for p in (data / "test").iterdir() if p.is_dir()), predictions,
                      overwrite=overwrite)
    click.echo(f"predictions: {summary['n_images']} test images, {summary['n_anomalous']} flagged -> "
               f"{(predictions / 'index.html').resolve()} (overlays and masks beside it)")
    click.echo(f"report: {(run / 'report.html').resolve()}")


@main.command("serve")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; the default takes connections from this machine only.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--onnx", is_flag=True, help="score with ONNX Runtime (the run's detector, exported at start-up).")
@click.option("--token", envvar="ANOMALAB_TOKEN", default=None,
              help="require `Authorization: Bearer TOKEN` on every request but the page (or set ANOMALAB_TOKEN, "
                   "which `ps` does not show).")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="images per scoring call (default 32, as `anomalab score`: the same scores bit for bit).")
def serve_cmd(run_dir, host, port, onnx, token, batch_size) -> None:
    """Serve the detector saved in RUN_DIR over HTTP: POST /v1/score (image files -> score, verdict,
    overlay), GET /v1/model, GET /healthz, and a page at / to drop images on. Needs `pip install
    anomalab[serve]`; see docs/deployment.md."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: form uploads)
        import uvicorn
    except ImportError as e:
        raise UserError(f"`anomalab serve` needs FastAPI, uvicorn and python-multipart ({e.name} is missing): "
                        "pip install anomalab[serve]") from None
    from anomalab import scoring
    from anomalab.serve.app import create_app

    app = create_app(run_dir, onnx=onnx, token=token, batch_size=batch_size or scoring.SCORE_BATCH)
    model = app.state.model
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        click.echo(f"warning: listening on {host} without --token: anyone who can reach port {port} can use it",
                   err=True)
    click.echo(f"serving {model.det.name} from {run_dir} ({model.engine}) on http://{host}:{port}/ "
               f"(Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)


if __name__ == "__main__":
    main()
