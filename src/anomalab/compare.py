"""`anomalab compare`: every detector on your data, one leaderboard.

    from anomalab.compare import compare
    board = compare(["textures:brick", "textures:grass"], "runs/cmp", family="features", budget="quick")
    board["recommendation"]["text"]

A *cell* is one (data spec, detector, seed). For each cell, `fit_run` fits the detector on the spec's
normal training images with the budget's parameters (`BUDGETS`), fits its threshold on normal images it
did not train on, evaluates it on the spec's test set and writes the run folder
`OUT/runs/<spec-name>/<detector>_s<seed>/` atomically, with its own report.html. Every cell runs in a fresh
Python process (unless `isolate=False`), so its peak memory is its own: the high-water mark of that
process's resident set (`VmHWM` in /proc/self/status on Linux, where a child's `ru_maxrss` would start at
its parent's peak; `resource.getrusage` ru_maxrss elsewhere), i.e. the largest resident set it reached while
importing, loading the data, fitting, calibrating, evaluating and drawing its figures; the same mark once
the imports are done (`base_rss_mb`) is recorded beside it.

Finished cells are appended at once to `OUT/results.jsonl` (a `ResultStore` keyed by data, detector, seed
and budget), so an interrupted comparison continues where it stopped; a finished cell is fitted again only
with `refit=True`. A cell that fails is recorded with its one-line error (and retried only with
`retry_failed=True`); the other cells go on. After every cell the leaderboard is rewritten from the store:
`leaderboard.html` (self-contained), `leaderboard.json`, `leaderboard.csv` and `leaderboard.md`.

Detectors without a `seed` parameter (`knn`, `gaussian`) are deterministic: they are fitted once, at the
first seed, since every seed would give the same run. `knn` and `pca` are always compared.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalab._version import __version__
from anomalab.errors import DataError, ParameterError, RunFolderError
from anomalab.runs.atomic import OLD_TAG, TargetLock, temp_sibling, write_file_atomic
from anomalab.runs.fit import fit_run
from anomalab.runs.outputs import check_not_input
from anomalab.runs.store import ResultStore

log = logging.getLogger("anomalab.progress")

MARKER = "compare.json"  # marks a folder this module wrote (the only kind `overwrite` replaces)
RESULTS = "results.jsonl"
KEY = ("data", "detector", "seed", "budget")
FORMAT = 1

BASELINES = ("knn", "pca")
FAMILIES: dict[str, tuple[str, ...]] = {
    "baselines": BASELINES,
    "features": ("gaussian", "patchcore", "padim", "metric"),  # pretrained ImageNet features
    "ae": ("conv_ae", "vae"),  # autoencoders trained on your images
    "gan": ("anogan", "egbad", "ganomaly", "skip_ganomaly"),
}
FAMILY_CHOICES = ("features", "gan", "ae", "all")

# Parameters per budget and detector. Two keys are not detector parameters: "steps" sets `epochs` so that
# training runs about that many optimisation steps (mini-batches) on the spec's training images; "size"
# reads a texture or folder spec's images at that side (the spec's size option, unless it sets one). A
# detector missing from a budget gets its defaults. `standard` is every detector's defaults (the
# trained ones extend their epochs to 500 steps on small sets, docs/cli.md); `paper` gives the papers'
# epochs explicitly (no extension) and their scoring settings; `quick` is for a first look in minutes.
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "gaussian": {"image_size": 128},
        "patchcore": {"image_size": 128, "coreset_ratio": 0.01},
        "padim": {"image_size": 128},
        "metric": {"image_size": 64, "epochs": 2},
        "conv_ae": {"size": 32, "steps": 300},
        "vae": {"size": 32, "steps": 300},
        "anogan": {"size": 32, "steps": 100, "n_steps": 50},
        "egbad": {"size": 32, "steps": 150},
        "ganomaly": {"size": 32, "steps": 100},
        "skip_ganomaly": {"size": 32, "steps": 100},
    },
    "standard": {},
    "paper": {
        "conv_ae": {"epochs": 20},
        "vae": {"epochs": 20},
        "anogan": {"epochs": 15},
        "egbad": {"epochs": 100},
        "ganomaly": {"epochs": 15},
        "skip_ganomaly": {"epochs": 15},
        "patchcore": {"reweight": True},
        "metric": {"image_size": 224, "train_blocks": 16, "epochs": 20},
    },
}
BUDGET_WORDS = {
    "quick": "a first look in minutes: the feature detectors at 128 px (metric at 64 px, 2 epochs), a 1 % "
             "coreset; the trained detectors at 32 px for 100-300 optimisation steps, far from converged, so "
             "their rows are a floor",
    "standard": "every detector's defaults, as `anomalab fit` uses them",
    "paper": "the papers' schedules: their epochs exactly (no extension to 500 steps) and scoring settings",
}
DEFAULT_SEEDS = {"quick": (0,), "standard": (0, 1, 2), "paper": (0, 1, 2)}  # when no seeds are given
MIN_IMAGES_PER_S = 20.0  # default speed budget of the recommendation: test images scored per second


# ---- what to run --------------------------------------------------------------------------------------------
def family_of(detector: str) -> str:
    for family, names in FAMILIES.items():
        if detector in names:
            return family
    return "other"


def select_detectors(detectors: str | Sequence[str] | None = None, family: str | None = None) -> list[str]:
    """The detectors to compare, baselines first: the named ones (`"a,b"` or a list), else the registered
    detectors of `family` (features, gan, ae, all; default all). `knn` and `pca` are always added."""
    from anomalab.params import choose
    from anomalab.registry import REGISTRY

    if detectors is not None and family is not None:
        raise ParameterError("give --detectors or --family, not both")
    if detectors is not None:
        names = [d.strip() for d in (detectors.split(",") if isinstance(detectors, str) else detectors)]
        names = [choose(d, REGISTRY, "detector") for d in names if d]
        if not names:
            raise ParameterError("--detectors is empty: name detectors, e.g. --detectors knn,patchcore")
    else:
        family = choose(family or "all", FAMILY_CHOICES, "family")
        names = [d for d in REGISTRY if family == "all" or d in FAMILIES[family]]
    ordered = [*BASELINES, *names]
    return [d for i, d in enumerate(ordered) if d not in ordered[:i]]


def takes_seed(detector: str) -> bool:
    """Whether the detector has a `seed` parameter (read from its source, nothing imported)."""
    from anomalab.registry import describe

    return "seed" in describe(detector)[1]


def spec_name(spec: str) -> str:
    """A folder name for a data spec: mnist-anomaly0, textures-brick, the folder's name; options appended."""
    from anomalab.data.specs import parse_spec

    kind, target, opts = parse_spec(spec)
    if kind == "mnist":
        base = f"mnist-anomaly{opts.get('anomaly', '')}"
        opts = {k: v for k, v in opts.items() if k != "anomaly"}
    elif kind == "textures":
        base = f"textures-{target}"
    else:
        base = Path(target).expanduser().resolve().name or "data"
    extra = "".join(f"-{k}{Path(v).name if k == 'root' else v}" for k, v in sorted(opts.items()))
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base + extra).strip("-.") or "data"


def check_test_set(spec: str) -> None:
    """A DataError for a spec without labelled test images (a plain folder of good images, or an MVTec folder
    without test/), naming `anomalab make-defects`, which builds one from good images."""
    from anomalab.data.specs import parse_spec

    kind, target, _ = parse_spec(spec)
    if kind != "folder":
        return
    path = Path(target)
    if (path / "train" / "good").is_dir() and (path / "test").is_dir():
        return
    good = path / "train" / "good" if (path / "train" / "good").is_dir() else path
    raise DataError(f"data spec {spec!r} has no test set (no {path / 'test'} folder): compare ranks detectors by "
                    "how they separate good from defective test images. Build a labelled test set from your good "
                    f"images: anomalab make-defects {good} --kind scratch --kind blob --n 20 --out "
                    f"{path.name}-defects, then compare on --data {path.name}-defects")


def n_train_images(spec: str) -> int:
    """How many normal training images the spec has (counted without reading them where possible)."""
    from anomalab.data.folder import list_images
    from anomalab.data.specs import DEFAULT_TEXTURES_ROOT, load_spec, parse_spec

    kind, target, opts = parse_spec(spec)
    if kind == "folder":
        return len(list_images(Path(target) / "train" / "good"))
    if kind == "textures":
        good = Path(opts.get("root", DEFAULT_TEXTURES_ROOT)) / target / "train" / "good"
        if good.is_dir():
            return len(list_images(good))
    return len(load_spec(spec)[0])


def budget_params(detector: str, budget: str, n_train: int | None = None, calib_frac: float = 0.1) -> dict:
    """The parameters `budget` gives `detector`; `steps` becomes epochs for `n_train` training images (of
    which the detector trains on all but the `calib_frac` held out for its threshold)."""
    from anomalab.params import choose
    from anomalab.registry import describe

    params = dict(BUDGETS[choose(budget, BUDGETS, "budget")].get(detector, {}))
    params.pop("size", None)
    steps = params.pop("steps", None)
    if steps is not None:
        if n_train is None:
            raise ValueError(f"{detector}: the {budget} budget counts steps; pass n_train")
        batch = int(params.get("batch_size", describe(detector)[1].get("batch_size", 64)))
        n_fit = n_train - max(1, int(round(calib_frac * n_train))) if n_train > 1 else n_train
        params["epochs"] = max(1, math.ceil(steps / max(1, math.ceil(n_fit / batch))))
    return params


def fit_spec(spec: str, detector: str, budget: str) -> str:
    """The spec the detector is fitted and tested on: `spec`, with the budget's image side for the detector
    (`size`) as the spec's size option where the spec takes one and does not set it already."""
    from anomalab.data.specs import parse_spec

    size = BUDGETS[budget].get(detector, {}).get("size")
    kind, _, opts = parse_spec(spec)
    if size is None or kind not in ("textures", "folder") or "size" in opts:
        return spec
    return f"{spec},size={int(size)}"


def _fit_command(cell: dict) -> str:
    params = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in cell["params"].items())
    return f"anomalab fit {cell['detector']} --data {cell['fit_data']} --out {cell['run']}" + (f" {params}"
                                                                                                 if params else "")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:400] if text else type(e).__name__


# ---- one cell ---------------------------------------------------------------------------------------------
def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def fit_cell(cell: dict) -> dict:
    """Fit, calibrate, evaluate and write one cell's run folder (`fit_run`); the result row. A failure is
    a row with status "failed" and the one-line error, never an exception (except an interruption)."""
    row = {k: cell[k] for k in KEY}
    row.update(spec_name=cell["spec_name"], fit_data=cell["fit_data"], run=cell["run_rel"], params=cell["params"])
    t0 = time.perf_counter()
    try:
        det, ev, run = fit_run(cell["detector"], dict(cell["params"]), cell["fit_data"], cell["run"],
                               overwrite=True, figures=cell.get("figures", True), command=_fit_command(cell))
        config = json.loads((Path(run) / "config.json").read_text())
        metrics = {k: _finite(v) for k, v in ev.metrics.items()}
        per_defect = {str(r["name"]): _finite(r.get("auroc")) for r in ev.extra.get("per_class", [])
                      if r.get("label") == 1}
        row.update(status="ok", image_auroc=metrics.get("image_auroc"), aupr=metrics.get("aupr"),
                   pixel_auroc=metrics.get("pixel_auroc"), aupro=metrics.get("aupro"),
                   false_alarm_rate=metrics.get("fpr_at_threshold"), catch_rate=metrics.get("tpr_at_threshold"),
                   per_defect=per_defect, threshold=float(det.threshold_.value), n_train=config.get("n_train"),
                   n_calibration=config.get("n_calibration"), calib_folds=config.get("calib_folds"),
                   n_test=len(ev.labels), n_anomalous=int(np.sum(ev.labels == 1)),
                   fit_s=ev.timings.get("fit_s"), calibration_s=ev.timings.get("calibration_s"),
                   score_images_per_s=ev.timings.get("score_images_per_s"),
                   model_bytes=_dir_bytes(Path(run) / "detector"), params=config.get("params", cell["params"]),
                   report=f"{cell['run_rel']}/report.html")
    except Exception as e:  # noqa: BLE001 - a failing cell is recorded, the comparison goes on
        row.update(status="failed", error=_one_line(e), traceback=traceback.format_exc(limit=8))
    row.update(cell_s=time.perf_counter() - t0, finished=time.time(), anomalab=__version__)
    return row


def _max_rss_mb() -> float:
    """This process's peak resident set in MiB: VmHWM of /proc/self/status where there is one (Linux: the
    high-water mark of this process's own address space; its ru_maxrss would start at the parent's peak at
    fork), else ru_maxrss (bytes on macOS)."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _child(argv: Sequence[str]) -> int:
    """`python -m anomalab.compare CELL.json RESULT.json`: one cell in this fresh process."""
    cell = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for name in ("anomalab.progress", "anomalab.train.epochs"):
        logging.getLogger(name).setLevel(logging.INFO)
    import torch

    from anomalab.registry import detector_class

    if cell.get("threads"):
        torch.set_num_threads(int(cell["threads"]))
    if "epochs" in cell["params"]:  # the budget chose the epochs: no warning that they are fewer than 500 steps
        logging.getLogger("anomalab.train.epochs").setLevel(logging.ERROR)
    detector_class(cell["detector"])  # its modules count towards the base, not towards the cell
    base = _max_rss_mb()
    row = fit_cell(cell)
    row.update(peak_rss_mb=_max_rss_mb(), base_rss_mb=base, threads=torch.get_num_threads(), isolated=True)
    write_file_atomic(argv[1], json.dumps(row, default=str))
    return 0


def _run_isolated(cell: dict) -> dict:
    """Run `fit_cell` in a fresh process (peak memory of its own); a crash becomes a failed row."""
    with tempfile.TemporaryDirectory(prefix="anomalab-compare-") as tmp:
        cell_file, result_file = Path(tmp) / "cell.json", Path(tmp) / "result.json"
        cell_file.write_text(json.dumps(cell, default=str))
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "anomalab.compare", str(cell_file), str(result_file)])
        try:
            code = proc.wait()
        finally:  # interrupted or killed (SIGTERM, see compare): the cell's process never outlives us
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if result_file.is_file():
            return json.loads(result_file.read_text())
        if code in (130, -signal.SIGINT):
            raise KeyboardInterrupt
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        hint = " (out of memory?)" if code == -signal.SIGKILL else ""
        row = {k: cell[k] for k in KEY}
        row.update(spec_name=cell["spec_name"], run=cell["run_rel"], params=cell["params"], status="failed",
                   error=f"the cell's process {how}{hint} before writing a result",
                   cell_s=time.perf_counter() - t0, finished=time.time(), anomalab=__version__)
        return row


def _run_in_process(cell: dict) -> dict:
    import torch

    row = fit_cell(cell)
    row.update(peak_rss_mb=None, base_rss_mb=None, threads=torch.get_num_threads(), isolated=False)
    return row


# ---- the comparison ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While comparing (main thread only), SIGTERM raises SystemExit, so the running cell's process is
    stopped too (see _run_isolated) instead of outliving a killed comparison."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fmt_time(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _check_out(out: Path, overwrite: bool, inputs: Iterable[Path]) -> dict | None:
    """The output rule for a compare folder: absent or empty, or one compare wrote (compare.json): resumed,
    or with `overwrite` started over; any other folder is refused. Returns the existing marker, if any."""
    check_not_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    marker = out / MARKER
    if not marker.is_file():
        raise RunFolderError(f"{out} holds files that are not an anomalab compare folder (no {MARKER}); nothing "
                             "there is deleted: choose another --out")
    try:
        record = json.loads(marker.read_text())
    except ValueError:
        raise RunFolderError(f"{marker} is not valid JSON; choose another --out") from None
    return None if overwrite else record


def _start_over(out: Path) -> None:
    """Remove a compare folder (checked to be one) so the comparison starts from nothing."""
    if out.is_dir() and any(out.iterdir()):
        aside = temp_sibling(out, OLD_TAG)
        os.rename(out, aside)
        shutil.rmtree(aside, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def plan(data: Sequence[str], detectors: Sequence[str], seeds: Sequence[int], budget: str, out: Path,
         names: dict[str, str], figures: bool = True, threads: int | None = None) -> list[dict]:
    """Every cell of the comparison, in running order: per spec, per seed, per detector (baselines first);
    a detector without a `seed` parameter only at the first seed."""
    needs_n = [d for d in detectors if "steps" in BUDGETS[budget].get(d, {})]
    cells = []
    for spec in data:
        n_train = n_train_images(spec) if needs_n else None
        for i, seed in enumerate(seeds):
            for det in detectors:
                seeded = takes_seed(det)
                if not seeded and i:
                    continue
                params = budget_params(det, budget, n_train)
                if seeded:
                    params["seed"] = int(seed)
                rel = f"runs/{names[spec]}/{det}_s{seed}"
                cells.append({"data": spec, "fit_data": fit_spec(spec, det, budget), "detector": det,
                              "seed": int(seed), "budget": budget, "spec_name": names[spec], "params": params,
                              "run_rel": rel, "run": str(out / rel),
                              "seeded": seeded, "figures": figures, "threads": threads})
    return cells


def _estimate(cells: Sequence[dict], store: ResultStore) -> tuple[float, bool]:
    """Seconds the given cells should take, from the stored times of the same detector's cells (this spec's,
    else any spec's), else the mean of all timed cells; and whether any of them was such a guess."""
    by_key: dict[tuple[str, str], list[float]] = {}
    by_det: dict[str, list[float]] = {}
    for row in store.rows():
        took = row.get("wall_s", row.get("cell_s"))
        if took is not None:
            by_key.setdefault((row["spec_name"], row["detector"]), []).append(took)
            by_det.setdefault(row["detector"], []).append(took)
    every = [t for times in by_det.values() for t in times]
    total, guessed = 0.0, False
    for c in cells:
        times = by_key.get((c["spec_name"], c["detector"])) or by_det.get(c["detector"])
        if times:
            total += float(np.mean(times))
        else:
            guessed = True
            total += float(np.mean(every)) if every else 0.0
    return total, guessed


def compare(data: str | Sequence[str], out: str | Path, *, detectors: str | Sequence[str] | None = None,
            family: str | None = None, budget: str = "standard", seeds: Sequence[int] | None = None,
            overwrite: bool = False, refit: bool = False, retry_failed: bool = False, refit_stale: bool = False,
            figures: bool = True, isolate: bool = True, min_images_per_s: float = MIN_IMAGES_PER_S,
            command: str | None = None, echo: Callable[[str], None] | None = None) -> dict:
    """Fit every detector on every data spec's normal images (each seed), evaluate on its test set, and
    write the leaderboard into `out` (module docstring); returns the leaderboard (leaderboard.json's
    content). Everything is checked before anything is fitted: the specs and their test sets, the
    detector names and the budget's parameters, the seeds and the output folder."""
    from anomalab.data.specs import check_spec, inputs_of
    from anomalab.params import choose
    from anomalab.registry import create

    say = echo or log.info
    data = [data] if isinstance(data, str) else list(data)
    if not data:
        raise ParameterError("give at least one --data spec")
    data = [d for i, d in enumerate(data) if d not in data[:i]]
    budget = choose(budget, BUDGETS, "budget")
    seeds = list(dict.fromkeys(DEFAULT_SEEDS[budget] if seeds is None else seeds))
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ParameterError(f"--seeds must be integers >= 0, got {seeds}")
    if not (isinstance(min_images_per_s, (int, float)) and min_images_per_s > 0):
        raise ParameterError(f"--min-speed must be a positive number of images/s, got {min_images_per_s!r}")
    names_list = select_detectors(detectors, family)
    inputs: list[Path] = []
    for spec in data:
        check_spec(spec)
        check_test_set(spec)
        inputs.extend(inputs_of(spec))
    for det in names_list:  # names, types and values of the budget's parameters, before any work
        create(det, **budget_params(det, budget, n_train=1000))
    out = Path(out)
    lock_target = out
    existing = _check_out(out, overwrite, inputs)
    lock = TargetLock(lock_target).acquire()
    try:
        if existing is None:
            _start_over(out)
        elif existing.get("budget") != budget:
            raise RunFolderError(f"{out} holds a --budget {existing.get('budget')} comparison; its run folders would "
                                 f"mix with --budget {budget}: choose another --out, or pass --overwrite to start "
                                 "over")
        names = dict((existing or {}).get("spec_names", {}))
        for spec in data:
            if spec not in names:
                base, k = spec_name(spec), 2
                name = base
                while name in names.values():
                    name, k = f"{base}-{k}", k + 1
                names[spec] = name
        import torch

        marker = {"kind": "compare", "format": FORMAT, "anomalab": __version__, "budget": budget,
                  "created": (existing or {}).get("created", time.time()), "updated": time.time(),
                  "spec_names": names,
                  "request": {"data": data, "detectors": names_list, "seeds": seeds, "figures": figures,
                              "min_images_per_s": min_images_per_s, "command": command}}
        write_file_atomic(out / MARKER, json.dumps(marker, indent=1))
        cells = plan(data, names_list, seeds, budget, out.resolve(), names, figures=figures,
                     threads=torch.get_num_threads())
        store = ResultStore(out / RESULTS, key=KEY)
        todo, stale = [], []
        for c in cells:
            row = store.get(c)
            changed = row is not None and row.get("status") == "ok" and stale_params(c, row)
            if changed:
                stale.append(f"{c['spec_name']} {c['detector']} s{c['seed']} ({', '.join(changed)})")
            if refit or row is None or (retry_failed and row.get("status") != "ok") or (refit_stale and changed):
                todo.append(c)
        if stale:
            say(f"compare: {len(stale)} finished cell{'s' * (len(stale) > 1)} fitted with other parameters than "
                f"this version's: {'; '.join(stale[:6])}{' ...' if len(stale) > 6 else ''}; "
                + ("refitting them" if refit_stale or refit else "kept (--refit-stale fits them again)"))
        context = dict(budget=budget, seeds=seeds, min_images_per_s=min_images_per_s, command=command,
                       isolated=isolate)
        say(f"compare: {len(data)} data spec{'s' * (len(data) > 1)} x {len(names_list)} detectors, seeds "
            f"{' '.join(map(str, seeds))}, budget {budget}: {len(cells)} cells, {len(cells) - len(todo)} already "
            f"done ({out / RESULTS}), {len(todo)} to fit")
        board = write_leaderboard(out, cells, store, **context)
        start = time.perf_counter()
        with _sigterm_exits():
            for i, c in enumerate(todo):
                left, guessed = _estimate(todo[i:], store)
                seed = f"seed {c['seed']}" if c["seeded"] else "deterministic (no seed)"
                eta = f"about {_fmt_time(left)} left" + (" (rough: some detectors not timed yet)" if guessed else "")
                say(f"[{i + 1}/{len(todo)}] {c['spec_name']}: {c['detector']}, {seed}; "
                    f"{_fmt_time(time.perf_counter() - start)} so far, {eta}")
                t0 = time.perf_counter()
                row = _run_isolated(c) if isolate else _run_in_process(c)
                row["wall_s"] = time.perf_counter() - t0  # with the process start-up, for the estimates
                store.add(row)
                if row["status"] != "ok":
                    say(f"    failed: {row['error']}")
                else:
                    auroc = "" if row.get("image_auroc") is None else f"image AUROC {row['image_auroc']:.3f}, "
                    say(f"    {auroc}fit {row['fit_s']:.1f} s, cell {row['wall_s']:.1f} s")
                board = write_leaderboard(out, cells, store, **context)
        if todo:
            say(f"compare: {len(todo)} cells in {_fmt_time(time.perf_counter() - start)}")
        return board
    finally:
        lock.release()


def stale_params(cell: dict, row: dict) -> list[str]:
    """Parameters on which a finished cell's fitted detector (`row["params"]`) differs from what the cell
    would fit now (its budget's parameters over the detector's current defaults): a default that changed
    between versions. `device` is not compared."""
    from anomalab.params import signature_defaults
    from anomalab.registry import detector_class

    now = json.loads(json.dumps({**signature_defaults(detector_class(cell["detector"])), **cell["params"]}))
    then = row.get("params") or {}
    return sorted(k for k, v in now.items() if k != "device" and then.get(k, object()) != v)


# ---- the leaderboard --------------------------------------------------------------------------------------
METRICS = ("image_auroc", "aupr", "pixel_auroc", "aupro", "false_alarm_rate", "catch_rate")
MEANS = ("fit_s", "cell_s", "score_images_per_s", "model_bytes", "base_rss_mb")


def _stat(values: Iterable[Any]) -> dict | None:
    """{"mean", "std" (population, over seeds), "n", "values"} of the finite values, None without any."""
    v = [float(x) for x in values if _finite(x) is not None]
    if not v:
        return None
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v), "values": v}


def _mean(entry: dict | None) -> float | None:
    return None if entry is None else entry["mean"]


def _side(cell: dict) -> int | None:
    """The image side the budget read the spec's images at for this cell, None when read as they are."""
    from anomalab.data.specs import parse_spec

    if cell.get("fit_data", cell["data"]) == cell["data"]:
        return None
    return int(parse_spec(cell["fit_data"])[2]["size"])


def _aggregate(det: str, cells: Sequence[dict], store: ResultStore) -> dict:
    """One leaderboard row: a detector on one spec, over its seeds."""
    rows = [(c, store.get(c)) for c in cells]
    ok = [r for _, r in rows if r is not None and r.get("status") == "ok"]
    failed = [r for _, r in rows if r is not None and r.get("status") != "ok"]
    pending = [c for c, r in rows if r is None]
    entry: dict[str, Any] = {"detector": det, "family": family_of(det), "seeded": cells[0]["seeded"],
                             "cells": len(cells), "done": len(ok), "failed": len(failed), "pending": len(pending),
                             "image_side": _side(cells[0])}
    for k in METRICS:
        entry[k] = _stat(r.get(k) for r in ok)
    defects = sorted({d for r in ok for d in (r.get("per_defect") or {})})
    entry["per_defect"] = {d: _stat((r.get("per_defect") or {}).get(d) for r in ok) for d in defects}
    for k in MEANS:
        entry[k] = _stat(r.get(k) for r in ok)
    entry["peak_rss_mb"] = _stat(r.get("peak_rss_mb") for r in ok)
    entry["seeds"] = [r["seed"] for r in ok]
    entry["reports"] = [{"seed": r["seed"], "report": r.get("report")} for r in ok]
    entry["errors"] = [{"seed": r["seed"], "error": r.get("error")} for r in failed]
    entry["status"] = ("pending" if len(pending) == len(cells) else "failed" if not ok and not pending
                       else "partial" if failed or pending else "ok")
    return entry


def _n_normal(row: dict) -> int:
    """The spec's normal training images, from a row: all of them are n_train when cross-fitting."""
    return row["n_train"] + (0 if (row.get("calib_folds") or 0) >= 2 else row.get("n_calibration") or 0)


def _sort(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda e: (_mean(e["image_auroc"]) is None, -(_mean(e["image_auroc"]) or 0.0),
                                          e["detector"]))


def _baseline_notes(entries: list[dict]) -> None:
    """Each non-baseline row says whether it beats the knn and pca baselines (by mean image AUROC)."""
    base = {e["detector"]: _mean(e["image_auroc"]) for e in entries if e["detector"] in BASELINES}
    base = {k: v for k, v in base.items() if v is not None}
    for e in entries:
        m = _mean(e["image_auroc"])
        if e["detector"] in BASELINES:
            e["note"] = "baseline"
        elif m is None:
            e["note"] = ""
        elif not base:
            e["note"] = "no baseline result to compare with"
        else:
            lost = [f"{k} ({v:.3f})" for k, v in sorted(base.items(), key=lambda kv: -kv[1]) if m < v]
            e["note"] = ("loses to " + " and ".join(lost) if lost
                         else f"beats {' and '.join(sorted(base))}")
        if e["status"] in ("failed", "partial") and e["errors"]:
            e["note"] = "; ".join(filter(None, [e["note"], f"{e['failed']} of {e['cells']} cells failed"]))
        if e.get("image_side"):
            e["note"] = "; ".join(filter(None, [e["note"], f"images read at {e['image_side']} px"]))
        if e["pending"] and e["status"] != "pending":
            e["note"] = "; ".join(filter(None, [e["note"], f"{e['pending']} of {e['cells']} cells not run yet"]))


def _over_specs(stats: list[dict]) -> dict | None:
    """Per-spec stats combined: mean of the means, `std` the mean of the per-spec stds over seeds (so that
    ± keeps meaning the seeds' spread), `spread` the std of the means over the specs, `values` the means."""
    if not stats:
        return None
    means = [s["mean"] for s in stats]
    return {"mean": float(np.mean(means)), "std": float(np.mean([s["std"] for s in stats])),
            "n": max(s["n"] for s in stats), "values": means, "spread": float(np.std(means))}


def _summary(tables: list[dict], detectors: Sequence[str]) -> list[dict]:
    """One row per detector across the specs: each value the mean over the specs of the per-spec means."""
    out = []
    for det in detectors:
        per = [next((e for e in t["rows"] if e["detector"] == det), None) for t in tables]
        entry: dict[str, Any] = {"detector": det, "family": family_of(det), "categories": len(tables),
                                 "complete": sum(1 for e in per if e is not None and e["status"] == "ok"),
                                 "done": sum(e["done"] for e in per if e), "cells": sum(e["cells"] for e in per if e),
                                 "failed": sum(e["failed"] for e in per if e),
                                 "image_side": next((e["image_side"] for e in per if e and e["image_side"]), None),
                                 "pending": sum(e["pending"] for e in per if e)}
        for k in (*METRICS, *MEANS, "peak_rss_mb"):
            entry[k] = _over_specs([e[k] for e in per if e is not None and e[k] is not None])
        entry["by_category"] = {t["name"]: _mean(e["image_auroc"]) if e else None for t, e in zip(tables, per)}
        aurocs = [v for v in entry["by_category"].values() if v is not None]
        entry["worst_category"] = min(aurocs) if aurocs else None
        entry["errors"] = [dict(x, data=t["name"]) for t, e in zip(tables, per) if e for x in e["errors"]]
        entry["status"] = ("ok" if entry["complete"] == len(tables) else "pending" if not entry["done"]
                           and not entry["failed"] else "failed" if not entry["done"] and not entry["pending"]
                           else "partial")
        out.append(entry)
    out = _sort(out)
    _baseline_notes(out)
    for e in out:
        if e["status"] != "ok" and e["done"] and not e["pending"]:
            e["note"] = "; ".join(filter(None, [e["note"], f"complete on {e['complete']} of {e['categories']} "
                                                           "categories: its means are over fewer"]))
    return out


def recommend(entries: list[dict], min_images_per_s: float, n_seeds: int, n_specs: int, budget: str) -> dict:
    """Best quality (highest mean image AUROC among detectors whose cells all finished) and best quality
    within the speed budget (scoring at least `min_images_per_s` test images per second), in one line,
    with what it rests on."""
    done = [e for e in entries if e["status"] == "ok" and _mean(e["image_auroc"]) is not None]
    over = f" and {n_specs} data sets" if n_specs > 1 else ""
    basis = (f"Based on the mean image AUROC on the test set{'s' if n_specs > 1 else ''} ({n_seeds} seed"
             f"{'s' if n_seeds > 1 else ''}{over}; budget {budget}; population std over seeds) and on the scoring "
             "speed measured here (test images per second, one process, this machine's threads); false-alarm "
             "rates, pixel metrics and fit time are not weighed in.")
    if not done:
        return {"text": "No detector has finished every cell yet: no recommendation.", "best": None,
                "best_fast": None, "based_on": basis, "min_images_per_s": min_images_per_s}

    def auroc(e: dict) -> str:
        a = e["image_auroc"]
        return f"{a['mean']:.3f}" + (f" ± {a['std']:.3f}" if a["n"] > 1 else "")

    def speed(e: dict) -> float:
        return _mean(e["score_images_per_s"]) or 0.0

    best = max(done, key=lambda e: _mean(e["image_auroc"]))
    text = f"Best quality: {best['detector']} (image AUROC {auroc(best)})"
    close = []
    for e in done:
        gap = _mean(best["image_auroc"]) - _mean(e["image_auroc"])
        if e is not best and (gap <= 0.005 or (e["image_auroc"]["n"] > 1 and gap <= max(
                best["image_auroc"]["std"], e["image_auroc"]["std"]))):
            close.append(e)
    if close:
        within = "one std or 0.005" if best["image_auroc"]["n"] > 1 else "0.005"
        text += f"; as good within {within}: " + ", ".join(f"{e['detector']} ({auroc(e)})" for e in close[:3])
    fast = [e for e in done if speed(e) >= min_images_per_s]
    best_fast = max(fast, key=lambda e: _mean(e["image_auroc"])) if fast else None
    if best_fast is best:
        text += f"; it also meets the speed budget ({speed(best):.0f} images/s scored, ≥ {min_images_per_s:g})."
    elif best_fast is not None:
        text += (f". Best within the speed budget (≥ {min_images_per_s:g} images/s scored; {best['detector']} "
                 f"scores {speed(best):.1f}): {best_fast['detector']} (image AUROC {auroc(best_fast)}, "
                 f"{speed(best_fast):.0f} images/s).")
    else:
        text += f". No detector scores ≥ {min_images_per_s:g} images/s here."
    return {"text": text, "best": best["detector"], "best_fast": best_fast["detector"] if best_fast else None,
            "based_on": basis, "min_images_per_s": min_images_per_s}


def leaderboard(cells: Sequence[dict], store: ResultStore, *, budget: str, seeds: Sequence[int],
                min_images_per_s: float = MIN_IMAGES_PER_S, command: str | None = None,
                isolated: bool = True) -> dict:
    """The leaderboard of `cells` from the rows in `store` (what leaderboard.json holds)."""
    specs: dict[str, list[dict]] = {}
    for c in cells:
        specs.setdefault(c["data"], []).append(c)
    tables, detectors = [], []
    for spec, spec_cells in specs.items():
        by_det: dict[str, list[dict]] = {}
        for c in spec_cells:
            by_det.setdefault(c["detector"], []).append(c)
            if c["detector"] not in detectors:
                detectors.append(c["detector"])
        rows = _sort([_aggregate(d, cs, store) for d, cs in by_det.items()])
        _baseline_notes(rows)
        first = [store.get(c) for c in spec_cells]
        ok = [r for r in first if r and r.get("status") == "ok"]
        tables.append({"data": spec, "name": spec_cells[0]["spec_name"], "rows": rows,
                       "defect_types": sorted({d for e in rows for d in e["per_defect"]}),
                       "n_train": next((_n_normal(r) for r in ok if r.get("n_train")), None),
                       "n_test": next((r["n_test"] for r in ok if r.get("n_test")), None),
                       "n_anomalous": next((r["n_anomalous"] for r in ok if r.get("n_anomalous") is not None), None)})
    summary = _summary(tables, detectors) if len(tables) > 1 else None
    rows_done = [store.get(c) for c in cells]
    bases = [r["base_rss_mb"] for r in rows_done if r and r.get("base_rss_mb")]
    board = {"format": FORMAT, "anomalab": __version__, "budget": budget, "budget_words": BUDGET_WORDS[budget],
             "budget_params": {d: BUDGETS[budget].get(d, {}) for d in detectors},
             "epochs_used": {d: sorted({r["params"]["epochs"] for r in rows_done if r and r["detector"] == d
                                        and r.get("status") == "ok" and "epochs" in (r.get("params") or {})})
                             for d in detectors if "steps" in BUDGETS[budget].get(d, {})},
             "seeds": list(seeds),
             "detectors": detectors, "data": list(specs), "tables": tables, "summary": summary,
             "cells": len(cells), "done": sum(1 for r in rows_done if r and r.get("status") == "ok"),
             "failed": sum(1 for r in rows_done if r and r.get("status") != "ok"),
             "cell_time_s": float(sum(r.get("cell_s") or 0 for r in rows_done if r)),
             "threads": next((r.get("threads") for r in rows_done if r and r.get("threads")), None),
             "cpus": os.cpu_count(), "isolated": isolated, "base_rss_mb": float(np.median(bases)) if bases else None,
             "base_rss_range": [float(min(bases)), float(max(bases))] if bases else None,
             "command": command, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    board["recommendation"] = recommend(summary if summary is not None else tables[0]["rows"], min_images_per_s,
                                        len(seeds), len(tables), budget)
    return board


def write_leaderboard(out: str | Path, cells: Sequence[dict], store: ResultStore, **context: Any) -> dict:
    """Rewrite leaderboard.{json,csv,md,html} in `out` from the store (each file atomically)."""
    out = Path(out)
    board = leaderboard(cells, store, **context)
    write_file_atomic(out / "leaderboard.json", json.dumps(board, indent=1, default=str))
    write_file_atomic(out / "leaderboard.csv", leaderboard_csv(board))
    write_file_atomic(out / "leaderboard.md", leaderboard_md(board))
    write_file_atomic(out / "leaderboard.html", leaderboard_html(board))
    return board


# ---- formats ------------------------------------------------------------------------------------------------
def _ms(entry: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """'0.912 ± 0.013' ('0.912' for one value, '' for none)."""
    if entry is None:
        return ""
    text = f"{scale * entry['mean']:.{digits}f}"
    return text + (f" ± {scale * entry['std']:.{digits}f}" if entry["n"] > 1 else "")


def _num(entry: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    return "" if entry is None else f"{scale * entry['mean']:.{digits}f}"


def _seeds(e: dict) -> str:
    if "categories" in e:
        return f"{e['complete']}/{e['categories']}"
    return f"{e['done']}/{e['cells']}" + ("" if e["seeded"] else " (deterministic)")


def leaderboard_csv(board: dict) -> str:
    """One row per (data, detector) and, for several specs, one per detector over all of them (data "all")."""
    defects = sorted({d for t in board["tables"] for d in t["defect_types"]})
    cols = ["data", "rank", "detector", "family", "status", "cells_done", "cells"]
    for k in METRICS:
        cols += [f"{k}_mean", f"{k}_std"]
    cols += [f"auroc_{d}" for d in defects]
    cols += ["fit_s", "cell_s", "score_images_per_s", "peak_rss_mb", "model_mb", "note", "errors", "reports"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)

    def line(data: str, rank: int, e: dict) -> list:
        r = [data, rank, e["detector"], e["family"], e["status"], e["done"], e["cells"]]
        for k in METRICS:
            r += ["" if e[k] is None else f"{e[k]['mean']:.5f}", "" if e[k] is None else f"{e[k]['std']:.5f}"]
        pd = e.get("per_defect") or {}
        r += ["" if pd.get(d) is None else f"{pd[d]['mean']:.5f}" for d in defects]
        peak = e["peak_rss_mb"]
        r += [_num(e["fit_s"], 2), _num(e["cell_s"], 2), _num(e["score_images_per_s"], 2),
              "" if peak is None else f"{(max(peak['values']) if 'values' in peak else peak['mean']):.0f}",
              _num(e["model_bytes"], 3, 1 / 2**20), e.get("note", ""),
              " | ".join(f"{x.get('data', data)} s{x['seed']}: {x['error']}" for x in e["errors"]),
              " ".join(x["report"] for x in e.get("reports", []) if x.get("report"))]
        return r

    for t in board["tables"]:
        for i, e in enumerate(t["rows"], 1):
            w.writerow(line(t["data"], i, e))
    for i, e in enumerate(board["summary"] or [], 1):
        w.writerow(line("all", i, e))
    return buf.getvalue()


def leaderboard_md(board: dict) -> str:
    """The tables as markdown (image AUROC and the main columns), for docs and pull requests."""
    lines = [f"Budget `{board['budget']}`, seeds {' '.join(map(str, board['seeds']))}; "
             f"{board['done']} of {board['cells']} cells done" + (f", {board['failed']} failed" if board["failed"]
                                                                    else "") + ".", "",
             board["recommendation"]["text"], ""]
    head = ["#", "detector", "seeds", "image AUROC", "AUPR", "pixel AUROC", "AUPRO", "false alarms", "caught",
            "fit s", "images/s", "peak MB", "model MB", "note"]

    cats = [t["name"] for t in board["tables"]]
    pixel = any(e["pixel_auroc"] is not None for t in board["tables"] for e in t["rows"])
    if not pixel:
        head = [h for h in head if h not in ("pixel AUROC", "AUPRO")]

    def row(i: int, e: dict) -> str:
        peak = e["peak_rss_mb"]
        per = [_f3(e["by_category"].get(c)) for c in cats] if "by_category" in e else []
        pixels = [_ms(e["pixel_auroc"]), _ms(e["aupro"])] if pixel else []
        cells = [str(i), e["detector"], _seeds(e), _ms(e["image_auroc"]), *per, _ms(e["aupr"]), *pixels,
                 _ms(e["false_alarm_rate"], 1, 100) + (" %" if e["false_alarm_rate"] else ""),
                 _ms(e["catch_rate"], 1, 100) + (" %" if e["catch_rate"] else ""), _num(e["fit_s"]),
                 _num(e["score_images_per_s"], 0), "" if peak is None else f"{max(peak['values']):.0f}",
                 _num(e["model_bytes"], 2, 1 / 2**20), e.get("note", "")]
        return "| " + " | ".join(cells) + " |"

    blocks = ([("all data sets (means over them; ± the seeds' std)", board["summary"])] if board["summary"]
              else []) + [(f"{t['name']} (`{t['data']}`)", t["rows"]) for t in board["tables"]]
    for title, rows in blocks:
        summary = bool(rows) and "by_category" in rows[0]
        cols = [*head[:2], "data sets complete", head[3], *cats, *head[4:]] if summary else head
        lines += [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += [row(i, e) for i, e in enumerate(rows, 1)]
        lines.append("")
    return "\n".join(lines)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1500px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.84em}
td,th{border:1px solid #d4d4d4;padding:.25em .45em;text-align:right;white-space:nowrap}
th{background:#f3f3f3;vertical-align:bottom;white-space:normal;font-weight:600}th.g{text-align:center}
td.l,th.l{text-align:left}tr.baseline td{background:#f4f4f4}tr.failed td{color:#999}
td.note{text-align:left;white-space:normal;min-width:13em;max-width:24em}
.lose{color:#b3261e}.win{color:#2e7d32}.sd{color:#777;font-size:.85em}
.track{display:inline-block;width:50px;height:.7em;background:rgba(0,0,0,.06);vertical-align:middle;
margin-right:.4em}.bar{display:block;height:100%;background:#4c78a8}
.wide{overflow-x:auto}.muted{color:#666;font-size:.9em}code{background:#f6f6f6;padding:0 .2em}
.rec{background:#e8f5e9;border-left:4px solid #2e7d32;padding:.6em 1em;margin:1em 0}
.warn{background:#fff8e1;border-left:4px solid #f9a825;padding:.4em .8em}
h2{border-top:2px solid #ddd;padding-top:.6em;margin-top:1.6em}dl{font-size:.9em}dt{font-weight:600;margin-top:.4em}
dd{margin-left:1.2em;color:#333}a{color:#1f5fa8}
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _heat(v: float | None) -> str:
    """A background from red (AUROC 0.5 or below) through yellow to green (1.0)."""
    if v is None:
        return ""
    t = min(1.0, max(0.0, (v - 0.5) / 0.5))
    return f' style="background:hsl({120 * t:.0f},65%,86%)"'


def _value(entry: dict | None, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """The mean, and ± the std in small grey type when there are several values (HTML)."""
    if entry is None:
        return ""
    text = f"{scale * entry['mean']:.{digits}f}{unit}"
    if entry["n"] > 1:
        text += f" <span class=sd>± {scale * entry['std']:.{digits}f}</span>"
    return text


def _td(content: str, style: str = "", title: str = "", cls: str = "") -> str:
    attrs = (f" class={cls}" if cls else "") + style + (f' title="{_esc(title)}"' if title else "")
    return f"<td{attrs}>{content}</td>"


def _seed_values(entry: dict | None) -> str:
    return "" if entry is None else "seeds: " + ", ".join(f"{v:.4f}" for v in entry.get("values", []))


def _auroc_cell(entry: dict | None) -> str:
    if entry is None:
        return "<td></td>"
    width = max(0.0, min(1.0, (entry["mean"] - 0.5) / 0.5)) * 50
    bar = f"<span class=track><span class=bar style=\"width:{width:.0f}px\"></span></span>"
    return _td(bar + _value(entry), _heat(entry["mean"]), _seed_values(entry), cls="l")


def _f3(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _row_html(i: int, e: dict, defects: Sequence[str], pixel: bool, summary: bool, categories: Sequence[str]) -> str:
    cls = "baseline" if e["detector"] in BASELINES else "failed" if e["status"] in ("failed", "pending") else ""
    note = e.get("note", "")
    note_cls = "lose" if note.startswith("loses") else "win" if note.startswith("beats") else ""
    peak = e["peak_rss_mb"]
    seeds = _td(_esc(_seeds(e).replace(" (deterministic)", " det.")),
                title="" if e.get("seeded", True) else "deterministic (no seed parameter): fitted once")
    head, *rest = note.split("; ") if note else [""]
    note = f"<span class={note_cls}>{_esc(head)}</span>" if note_cls else _esc(head)
    note += "".join(f"<br><span class=sd>{_esc(part)}</span>" for part in rest)
    if e["errors"]:
        note += "".join(f"<br><span class=muted>{_esc(x.get('data', ''))} s{x['seed']}: {_esc(x['error'])}</span>"
                        if summary else f"<br><span class=muted>s{x['seed']}: {_esc(x['error'])}</span>"
                        for x in e["errors"][:4])
    cells = [_td(str(i)), _td(f"<b>{_esc(e['detector'])}</b> <span class=sd>{_esc(e['family'])}</span>", cls="l"),
             seeds, _auroc_cell(e["image_auroc"]), f"<td class=note>{note}</td>", _td(_value(e["aupr"]))]
    if pixel:
        cells += [_td(_value(e["pixel_auroc"])), _td(_value(e["aupro"]))]
    if summary:
        cells.append(_td(_f3(e["worst_category"]), _heat(e["worst_category"])))
        cells += [_td(_f3(e["by_category"].get(c)), _heat(e["by_category"].get(c))) for c in categories]
    elif len(defects) > 1:
        cells += [_td(_value(e["per_defect"].get(d)), _heat(_mean(e["per_defect"].get(d))),
                      _seed_values(e["per_defect"].get(d))) for d in defects]
    worst_peak = "" if peak is None else f"{max(peak['values']):.0f}"
    cells += [_td(_value(e["false_alarm_rate"], 1, 100, " %")), _td(_value(e["catch_rate"], 1, 100, " %")),
              _td(_esc(_num(e["fit_s"]))), _td(_esc(_num(e["score_images_per_s"], 0))), _td(worst_peak),
              _td(_esc(_num(e["model_bytes"], 2, 1 / 2**20)))]
    if not summary:
        links = " ".join(f'<a href="{_esc(r["report"])}">s{r["seed"]}</a>' for r in e["reports"] if r.get("report"))
        cells.append(_td(links, cls="l"))
    return f"<tr class='{cls}'>{''.join(cells)}</tr>"


def _table_html(rows: list[dict], defects: Sequence[str] = (), summary: bool = False,
                categories: Sequence[str] = ()) -> str:
    """Two header rows: single columns span both; grouped ones (per type or data set, at the threshold,
    cost) have their group above."""
    pixel = any(e["pixel_auroc"] is not None for e in rows)
    top, sub = [], []

    def label_html(label: str) -> str:
        return _esc(label).replace("_", "_<wbr>")  # long defect names may break after an underscore

    def single(label: str, left: bool = False) -> None:
        top.append(f"<th rowspan=2{' class=l' if left else ''}>{label_html(label)}</th>")

    def group(label: str, labels: Sequence[str]) -> None:
        top.append(f"<th class=g colspan={len(labels)}>{_esc(label)}</th>")
        sub.extend(f"<th>{label_html(x)}</th>" for x in labels)

    single("#")
    single("detector (family)", True)
    single("categories complete" if summary else "seeds done")
    single("image AUROC" + (" (mean over data sets)" if summary else ""))
    single("note", True)
    single("AUPR")
    if pixel:
        single("pixel AUROC")
        single("AUPRO")
    if summary:
        single("worst data set")
        if categories:
            group("image AUROC per data set", categories)
    elif len(defects) > 1:  # one type alone is the image AUROC again
        group("AUROC per defect type", defects)
    group("at the saved threshold", ["false alarms", "caught"])
    group("cost on this machine", ["fit s", "images/s scored", "peak MB", "model MB"])
    if not summary:
        single("reports", True)
    body = "".join(_row_html(i, e, defects, pixel, summary, categories) for i, e in enumerate(rows, 1))
    return f"<div class=wide><table><tr>{''.join(top)}</tr><tr>{''.join(sub)}</tr>{body}</table></div>"


COLUMNS = [
    ("detector (family)", "the detector and its family: baselines (grey rows), features (pretrained ImageNet "
                          "features), ae (autoencoders), gan."),
    ("seeds done", "cells finished of those planned for the detector: one per seed, one only for a deterministic "
                   "detector (det.: no seed parameter, every seed would give the same run). In the table over all "
                   "data sets: the data sets on which every cell finished."),
    ("image AUROC", "area under the ROC curve of the image scores on the test set (1 = every defective image "
                    "scores above every good one, 0.5 = chance): mean and population std over seeds; the bar "
                    "starts at 0.5. Rows are sorted by it. Hover over a value for the seeds' values."),
    ("AUPR", "area under the precision-recall curve, defective images as positives."),
    ("pixel AUROC, AUPRO", "only where the test set has defect masks and the detector gives anomaly maps: ROC area "
                           "over all pixels, and the normalised area under the per-region overlap curve up to a 30 % "
                           "false-positive rate."),
    ("AUROC per defect type", "the image AUROC of each defect type's test images against all good test images."),
    ("worst data set, image AUROC per data set", "in the table over all data sets: the lowest of the per-data-set "
                                                 "mean AUROCs, and each of them."),
    ("at the saved threshold: false alarms, caught", "share of the good test images scored above the run's "
                                                     "threshold, and share of the defective ones. The threshold is "
                                                     "fitted on normal training images only (max false-positive "
                                                     "rate 1 %), never on the test set."),
    ("fit s", "seconds to fit the saved detector (training only: the threshold's cross-fitting or hold-out, the "
              "evaluation and the figures are not included)."),
    ("images/s scored", "test images scored per second (image scores, no maps), in one process with this machine's "
                        "torch threads."),
    ("peak MB", "largest resident set (VmHWM) of the cell's own process, the worst over seeds: Python, torch "
                "and the detector's code (the base above), the data, fitting, calibration, evaluation and figures. "
                "Empty when the cells ran in-process."),
    ("model MB", "size of the saved detector folder (weights and JSON) on disk."),
    ("reports", "each seed's run report (report.html in its run folder beside this page)."),
    ("note", "whether the detector beats the knn and pca baselines on mean image AUROC (or which it loses to), "
             "and failed cells with their error."),
]


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def leaderboard_html(board: dict) -> str:
    """The self-contained leaderboard page (no scripts, no external files; links to the runs' reports)."""
    n_specs = len(board["tables"])
    title = f"anomalab compare: {len(board['detectors'])} detectors on {n_specs} data set{'s' * (n_specs > 1)}"
    rec = board["recommendation"]
    parts = [f"<h1>{_esc(title)}</h1>",
             f"<div class=rec><b>Recommendation.</b> {_esc(rec['text'])}<br><span class=muted>{_esc(rec['based_on'])}"
             "</span></div>"]
    status = f"{board['done']} of {board['cells']} cells done"
    if board["failed"]:
        status += f", {board['failed']} failed"
    parts.append(f"<p>Budget <b>{_esc(board['budget'])}</b> ({_esc(board['budget_words'])}); seeds "
                 f"{_esc(' '.join(map(str, board['seeds'])))}; {status}; {_fmt_time(board['cell_time_s'])} of cell "
                 f"time on {board['cpus']} CPUs ({board['threads']} torch thread{'s' * (board['threads'] != 1)} per "
                 f"cell). Updated {_esc(board['updated'])}.</p>")
    if board["done"] + board["failed"] < board["cells"]:
        parts.append(f"<p class=warn>{board['cells'] - board['done'] - board['failed']} cells have not run yet: "
                     "rerun the same command to continue.</p>")
    if board.get("base_rss_mb"):
        lo, hi = board.get("base_rss_range") or [board["base_rss_mb"]] * 2
        parts.append(f"<p class=muted>Peak memory is the largest resident set (VmHWM) of each cell's own process; "
                     f"with torch and the detector's code imported, before any data is read, a cell's process holds "
                     f"{lo:.0f}-{hi:.0f} MB (median {board['base_rss_mb']:.0f}).</p>")
    elif not board.get("isolated", True):
        parts.append("<p class=muted>Cells ran in this process: no per-cell peak memory.</p>")
    if board["command"]:
        parts.append(f"<p class=muted>command: <code>{_esc(board['command'])}</code></p>")
    if board["summary"]:
        cats = [t["name"] for t in board["tables"]]
        parts.append("<h2>All data sets</h2><p class=muted>One row per detector: each value is the mean over the "
                     "data sets of the per-data-set means over seeds, ± the mean of the per-data-set stds over "
                     "seeds; sorted by image AUROC. The worst data set and each data set's AUROC show the spread "
                     "over data sets.</p>")
        parts.append(_table_html(board["summary"], summary=True, categories=cats))
    for t in board["tables"]:
        sizes = ""
        if t.get("n_train"):
            sizes = (f": {t['n_train']} normal training images, {t['n_test']} test images ({t['n_anomalous']} "
                     "defective)")
        parts.append(f"<h2>{_esc(t['name'])}</h2><p class=muted><code>{_esc(t['data'])}</code>{_esc(sizes)}</p>")
        parts.append(_table_html(t["rows"], t["defect_types"]))
    used = board.get("epochs_used", {})
    params = "".join(f"<tr><td class=l>{_esc(d)}</td><td class=l>{_esc(_params_text(p))}</td>"
                     f"<td>{_esc(', '.join(map(str, used.get(d, []))))}</td></tr>"
                     for d, p in board["budget_params"].items())
    parts.append(f"<h2>Budget {_esc(board['budget'])}</h2><p class=muted>Parameters given to each detector: "
                 "<code>steps</code> sets the epochs for about that many optimisation steps (mini-batches) on the "
                 "data set's training images (the epochs that gave are listed), <code>size</code> reads a texture or "
                 "folder data set's images at that side; everything else is the detector's default. Each run's "
                 "report has its full parameters.</p><table><tr><th class=l>detector</th><th class=l>parameters</th>"
                 f"<th>epochs used</th></tr>{params}</table>")
    parts.append("<h2>Columns</h2><dl>" + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in COLUMNS)
                 + "</dl>")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{_esc(title)}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
