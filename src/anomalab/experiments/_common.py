"""What the experiments share: the command line, the result store, `--set` parameters, a clock, number
formatting, markdown tables, figures, and the data and cached models that several of them use.

Every experiment module reads the same way: settings (constants at the top, each commented), run (cells
appended to a `ResultStore` as soon as each finishes, so a rerun skips what is done), table (results.md)
and figures, both rebuilt from the store.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalab.errors import ParameterError
from anomalab.params import choose, parse_items, signature_defaults, validate
from anomalab.runs.store import ResultStore

RESULTS_FILE = "results.jsonl"  # one JSON row per finished cell (anomalab.runs.store)
TABLE_FILE = "results.md"


# ---- resumable scoring -----------------------------------------------------------------------------
class ResumableScores:
    """A fitted detector whose `score` works through the images in chunks of `chunk` and saves the scores
    so far to `path` (.npz, replaced atomically) after each chunk; a later `score` of the same images
    continues after the last saved chunk. Everything else is the detector's (`evaluate` takes it as one).
    With `chunk` a multiple of the detector's `score_batch_size` the batches are those of one uncut call,
    so the scores are identical. `seconds`: scoring time of every chunk, the ones before a cut included.
    For detectors whose scoring is the expensive part (AnoGAN's latent search: 50 minutes for 1,400 digits)."""

    def __init__(self, detector, path: str | Path, chunk: int):
        self.detector, self.path, self.chunk = detector, Path(path), int(chunk)
        self.seconds = 0.0

    def __getattr__(self, attr: str):
        return getattr(self.detector, attr)

    def score(self, images) -> Any:
        import torch

        from anomalab.errors import LoadError
        from anomalab.runs.atomic import write_file_atomic

        n = len(images)
        checksum = float(images.double().sum())
        scores: list[np.ndarray] = []
        spent = 0.0
        if self.path.is_file():
            with np.load(self.path) as saved:
                if int(saved["n"]) != n or float(saved["checksum"]) != checksum:
                    raise LoadError(f"{self.path} holds scores of other images; remove it to score afresh")
                scores, spent = [saved["scores"]], float(saved["seconds"])
        done = sum(len(s) for s in scores)
        t0 = time.perf_counter()
        for i in range(done, n, self.chunk):
            scores.append(self.detector.score(images[i : i + self.chunk]).numpy().astype(np.float32))
            buf = io.BytesIO()
            np.savez(buf, n=n, checksum=checksum, scores=np.concatenate(scores),
                     seconds=spent + time.perf_counter() - t0)
            write_file_atomic(self.path, buf.getvalue())
        self.seconds = spent + time.perf_counter() - t0
        return torch.from_numpy(np.concatenate(scores)) if scores else torch.empty(0)


# ---- command line ----------------------------------------------------------------------------------
def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """`anomalab experiment NAME`'s parser: the module docstring's first sentence (its first paragraph)
    as description, `--out` (default runs/NAME)."""
    summary = " ".join((doc or name).strip().split("\n\n")[0].split())
    p = argparse.ArgumentParser(prog=f"anomalab experiment {name}", description=summary)
    p.add_argument("--out", type=Path, default=Path("runs") / name, help="output folder")
    return p


def open_store(out: Path, key: Sequence[str]) -> ResultStore:
    """The experiment's results.jsonl in `out` (created with the folder on the first row)."""
    out.mkdir(parents=True, exist_ok=True)
    return ResultStore(out / RESULTS_FILE, key=key)


def reopen(store: ResultStore) -> ResultStore:
    """The store read again from disk: rows another process sharing the folder has added since."""
    return ResultStore(store.path, key=store.key)


def detector_sets(items: Iterable[str], detectors: Iterable[str], extra: type | None = None
                  ) -> dict[str, dict[str, Any]]:
    """`--set DET.PARAM=VALUE` items -> {DET: {PARAM: value}}, each value converted and checked against
    detector DET's parameters (`anomalab.params.validate`); parameters of `extra` (a class whose
    `__init__` lists settings of the experiment's cell, not of the detector) are accepted too. A bad
    item raises one ParameterError naming the detector and the parameter."""
    from anomalab.registry import detector_class

    raw: dict[str, dict[str, str]] = {}
    for key, value in parse_items(items, what="--set").items():
        det, _, param = key.partition(".")
        if not param:
            raise ParameterError(f"--set {key}={value}: expected DET.PARAM=VALUE (e.g. ganomaly.epochs=5)")
        raw.setdefault(choose(det, detectors, "detector"), {})[param] = value
    out: dict[str, dict[str, Any]] = {}
    for det, params in raw.items():
        cell = {k: params.pop(k) for k in list(params) if extra is not None and k in signature_defaults(extra)}
        out[det] = validate(detector_class(det), params, owner=det)
        if cell:
            out[det].update(validate(extra, cell, owner=det))
    return out


# ---- timing ----------------------------------------------------------------------------------------
class Clock:
    """`with Clock() as c: ...`, then `c.wall_s` and `c.cpu_s` (CPU time of the process, all threads)."""

    wall_s = cpu_s = 0.0

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s, self.cpu_s = time.perf_counter() - self._wall, time.process_time() - self._cpu


# ---- numbers and tables ----------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".3f") -> str:
    """`value` formatted, '-' for None or NaN."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return format(value, spec)


def mean_std(values: Iterable[float], digits: int = 3, count: bool = False) -> str:
    """'0.912 ± 0.013' (population std; one value alone: '0.912'), with ' (n)' appended when `count`;
    '-' when there are none."""
    v = np.asarray(list(values), dtype=float)
    if not len(v):
        return "-"
    text = f"{v.mean():.{digits}f}" + (f" ± {v.std():.{digits}f}" if len(v) > 1 else "")
    return text + (f" ({len(v)})" if count else "")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a markdown table."""
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def write_table(out: Path, lines: Sequence[str], name: str = TABLE_FILE) -> str:
    """Write `lines` to `out/name` (results.md) and return the text."""
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text)
    return text


def report_table(store: ResultStore, out: Path, table_lines) -> list[dict]:
    """The stored rows (FileNotFoundError when there are none yet), with `table_lines(rows)` written to
    out/results.md and printed: the start of every experiment's `report`."""
    rows = store.rows()
    if not rows:
        raise FileNotFoundError(f"no results yet at {store.path}")
    print(write_table(out, table_lines(rows)))
    return rows


def write_json(out: Path, results: dict, name: str = "results.json") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(results, indent=1))
    return path


# ---- figures ---------------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def auroc_heatmap(data: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: Path, title: str) -> Path:
    """Image AUROC per (row, column) as a heat map with the values written in (0.3 .. 1 colour range)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(cols) + 1.5), 0.45 * len(rows) + 1.2))
    im = ax.imshow(data, vmin=0.3, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.7 else "k")
    fig.colorbar(im, ax=ax, label="image AUROC")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


# ---- data ------------------------------------------------------------------------------------------
TEXTURES_ROOT = Path("runs/datasets/textures")  # built with make_textures' defaults when missing


def ensure_textures(root: Path, categories: Sequence[str]) -> None:
    """Under TEXTURES_ROOT, write the texture categories that are missing (any other root is used as is)."""
    from anomalab.data.textures import CATEGORIES, make_textures

    missing = tuple(c for c in categories if c in CATEGORIES and not (root / c / "train").is_dir())
    if missing and Path(root) == TEXTURES_ROOT:
        make_textures(root, categories=missing)


# ---- conv28 experiments (latent_scatter, vae_error_histogram, vae_overcompression, vae_repair) -----
# One MNIST split and cached conv_ae / vae models (the conv28 network, docs/detectors/conv_ae_vae.md). The
# source encodes the 10,000 unseen MNIST test digits; with the 5,000 packaged digits we train on a
# stratified 80 % (4,000) and treat the other 1,000 (100 per digit) as the unseen digits; `--mnist-root`
# uses the IDX files instead (60,000 train / 10,000 test, as in the source).
CONV28_EPOCHS = 30  # full passes over the training digits (the source gives no schedule)
CONV28_BATCH_SIZE = 128
CONV28_UNSEEN_PER_DIGIT = 100  # packaged digits held out per class as the unseen digits
CONV28_MODELS = "runs/section1_models"  # cache of the trained models, shared by the four commands


def conv28_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    p = parser(name, doc)
    p.add_argument("--epochs", type=int, default=CONV28_EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mnist-root", default=None, help="folder with the MNIST IDX files (default: 5,000 digits)")
    p.add_argument("--models", default=CONV28_MODELS, help="cache of trained models")
    return p


def conv28_split(mnist_root: str | None, seed: int):
    """(training digits, unseen digits), both with classes = digit."""
    from anomalab.data.mnist import load_mnist

    if mnist_root:
        return load_mnist(mnist_root, "train"), load_mnist(mnist_root, "test")
    ds = load_mnist()
    rng = np.random.default_rng(seed)
    classes = ds.classes.numpy()
    unseen = np.concatenate([rng.permutation(np.flatnonzero(classes == d))[:CONV28_UNSEEN_PER_DIGIT]
                             for d in range(10)])
    seen = np.setdiff1d(np.arange(len(ds)), unseen)
    return ds.subset(seen), ds.subset(np.sort(unseen))


def conv28_model(kind: str, latent_dim: int, train, args: argparse.Namespace):
    """A fitted conv_ae / vae, loaded from the cache when the same settings were trained before."""
    from anomalab.registry import create, load

    data_tag = "idx" if args.mnist_root else "pkg"
    path = Path(args.models) / f"{kind}-z{latent_dim}-e{args.epochs}-s{args.seed}-{data_tag}"
    if (path / "detector.json").is_file():
        return load(path)
    det = create(kind, latent_dim=latent_dim, epochs=args.epochs, batch_size=CONV28_BATCH_SIZE, seed=args.seed)
    det.fit(train)
    det.save(path)
    return det
