"""Run folders and outputs never lose data: every writer x existing target, failures at each stage, bad values
for each parameter type, concurrent writers, and errors that tell a mistake from a bug."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli

from anomalab.runs.atomic import TargetLock


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.glob(f".{target.name}*"))


@pytest.fixture
def user_folder(tmp_path):
    """A folder of the user's own files (not a run)."""
    folder = tmp_path / "my_files"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / "photo.png").write_bytes(b"\x89PNG not really")
    return folder


@pytest.fixture(scope="module")
def old_run(mvtec_tree, tmp_path_factory):
    """A finished pca run (read-only: tests copy it before changing anything)."""
    out = tmp_path_factory.mktemp("runs") / "old"
    code, text = cli("fit", "pca", "n_components=2", "--data", mvtec_tree, "--out", out, "--no-figures")
    assert code == 0, text
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---- fit: the target ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_fit_never_replaces_a_folder_that_is_not_a_run(mvtec_tree, user_folder, flag):
    before = files_of(user_folder)
    code, text = cli("fit", "knn", "k=3", "--data", mvtec_tree, "--out", user_folder, *flag)
    assert code == 2 and "not an anomalab run folder" in text and len(text.strip().splitlines()) == 1
    assert files_of(user_folder) == before


def test_fit_never_writes_into_or_over_its_data(mvtec_tree, tmp_path):
    before = files_of(mvtec_tree)
    for out in (mvtec_tree, mvtec_tree / "runs" / "r", mvtec_tree.parent):
        code, text = cli("fit", "knn", "k=3", "--data", mvtec_tree, "--out", out, "--overwrite")
        assert code == 2 and "input" in text, (out, text)
    assert files_of(mvtec_tree) == before


def test_failed_overwrite_keeps_the_old_run(mvtec_tree, old_run, tmp_path):
    run = copy_run(old_run, tmp_path / "run")
    before = files_of(run)
    # k larger than the training set: refused inside fit, after the run was staged
    code, text = cli("fit", "knn", "k=500", "--data", mvtec_tree, "--out", run, "--overwrite", "--no-figures")
    assert code == 2 and "k must be in" in text
    assert files_of(run) == before
    assert hidden_siblings(run) == []


def test_overwrite_replaces_a_run_only_after_success(mvtec_tree, old_run, tmp_path):
    run = copy_run(old_run, tmp_path / "run")
    code, text = cli("fit", "knn", "k=3", "--data", mvtec_tree, "--out", run, "--overwrite", "--no-figures")
    assert code == 0, text
    assert json.loads((run / "config.json").read_text())["detector"] == "knn"
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert hidden_siblings(run) == []


def test_continue_from_is_only_read_even_when_nested_under_out(mvtec_tree, old_run, tmp_path):
    nest = tmp_path / "nest"
    nest.mkdir()
    old = copy_run(old_run, nest / "old")
    before = files_of(old)
    code, text = cli("fit", "pca", "--data", mvtec_tree, "--out", nest, "--overwrite", "--continue-from", old)
    assert code == 2 and "holds the input" in text
    assert files_of(old) == before


@pytest.mark.parametrize("stage", ["fit", "save", "evaluate", "figures", "report"])
def test_failure_at_any_stage_leaves_old_run_or_nothing(mvtec_tree, old_run, tmp_path, monkeypatch, stage):
    import anomalab.runs.fit as fitmod
    from anomalab.detectors.knn import KNN

    def boom(*a, **k):
        raise KeyboardInterrupt  # like Ctrl-C (or a kill) in the middle of that stage

    import anomalab.evaluation
    import anomalab.report.html

    target = {"fit": (KNN, "fit"), "save": (KNN, "save"), "evaluate": (anomalab.evaluation, "evaluate"),
              "figures": (fitmod, "evaluation_figures"), "report": (anomalab.report.html, "write_report")}[stage]
    monkeypatch.setattr(*target, boom)
    new = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        fitmod.fit_run("knn", {"k": 3}, str(mvtec_tree), new)
    assert not new.exists() and hidden_siblings(new) == []
    run = copy_run(old_run, tmp_path / "run")
    before = files_of(run)
    with pytest.raises(KeyboardInterrupt):
        fitmod.fit_run("knn", {"k": 3}, str(mvtec_tree), run, overwrite=True)
    assert files_of(run) == before and hidden_siblings(run) == []


def test_interrupt_in_the_cli_is_exit_130_and_writes_nothing(mvtec_tree, tmp_path, monkeypatch):
    from anomalab.detectors.knn import KNN

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(KNN, "fit", interrupted)
    code, text = cli("fit", "knn", "k=3", "--data", mvtec_tree, "--out", tmp_path / "r")
    assert code == 130 and "interrupted" in text
    assert not (tmp_path / "r").exists() and hidden_siblings(tmp_path / "r") == []


def test_killed_fit_leaves_no_run_and_the_retry_works(mvtec_tree, tmp_path):
    """A real SIGKILL while a VAE trains: the target never appears; the retry succeeds and removes the stale
    temporary folder of the killed process."""
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "anomalab.cli", "fit", "vae", "epochs=100000", "batch_size=4",
                             "--data", str(mvtec_tree), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".r.tmp-*/config.json")):
            time.sleep(0.2)
        assert list(tmp_path.glob(".r.tmp-*/config.json")), "the fit never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    code, text = cli("fit", "pca", "n_components=2", "--data", mvtec_tree, "--out", out, "--no-figures")
    assert code == 0, text
    assert hidden_siblings(out) == []


def test_a_second_writer_fails_at_once(mvtec_tree, tmp_path):
    out = tmp_path / "r"
    with TargetLock(out):
        code, text = cli("fit", "knn", "k=3", "--data", mvtec_tree, "--out", out)
    assert code == 2 and "being written by another process" in text
    assert not out.exists()
    assert cli("fit", "knn", "k=3", "--data", mvtec_tree, "--out", out, "--no-figures")[0] == 0


def test_two_fits_at_once_never_mix(mvtec_tree, tmp_path):
    """Two real processes on one --out: one wins and the other fails; the folder holds one run's config
    beside that same run's detector."""
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmds = [[sys.executable, "-m", "anomalab.cli", "fit", "vae", f"seed={s}", "epochs=3", "batch_size=8",
             "--data", str(mvtec_tree), "--out", str(out), "--no-figures"] for s in (0, 1)]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    results = [(p.wait(), p.stdout.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes in ([0, 2], [0, 0]), results  # [0, 0]: the second started after the first had finished
    config = json.loads((out / "config.json").read_text())
    saved = json.loads((out / "detector" / "detector.json").read_text())
    assert config["params"]["seed"] == saved["params"]["seed"]
    if codes == [0, 2]:
        loser = next(t for c, t in results if c == 2)
        assert "another process" in loser or "already holds an anomalab run" in loser


# ---- bad values: refused before any folder exists ----------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["knn", "k=three"], "knn: k must be an integer, got 'three'"),
    (["vae", "epochs=0"], "vae: epochs must be a positive integer"),
    (["vae", "batch_size=0"], "vae: batch_size must be a positive integer"),
    (["vae", "latent_dim=0"], "vae: latent_dim must be a positive integer"),
    (["vae", "lr=-1"], "vae: lr must be > 0"),
    (["vae", "device=bogus"], "vae: device must be"),
    (["vae", "epochs=ten"], "vae: epochs must be an integer, got 'ten'"),
    (["knn", "k==3"], "knn: k must be an integer, got '=3'"),
    (["knn", "k=3", "k=4"], "given twice"),
    (["knn", "k"], "is not key=value"),
    (["ganomaly", "bn_recalibrate=maybe"], "bn_recalibrate must be true or false"),
    (["knn", "--calib-frac", "-0.5"], "--calib-frac must be in [0, 1)"),
    (["knn", "--max-fpr", "2"], "--max-fpr must be in [0, 1)"),
    (["knn", "--data-opt", "sise=32"], "unknown option 'sise'"),
    (["knn", "--data-opt", "size=0"], "size must be a positive integer"),
    (["knn", "--data-opt", "channels=2"], "channels must be 1 or 3"),
])
def test_bad_values_are_one_line_before_anything_is_written(mvtec_tree, tmp_path, args, message):
    data = str(mvtec_tree)
    if "--data-opt" in args:
        i = args.index("--data-opt")
        data += "," + args[i + 1]
        args = args[:i] + args[i + 2:]
    out = tmp_path / "r"
    code, text = cli("fit", *args, "--data", data, "--out", out)
    assert code == 2, text
    assert text.startswith("error:") and message in text and len(text.strip().splitlines()) == 1, text
    assert not out.exists() and hidden_siblings(out) == []


def test_create_validates_like_the_cli():
    import anomalab
    from anomalab.errors import ParameterError

    with pytest.raises(ParameterError, match="knn: k must be an integer, got 'three'"):
        anomalab.create("knn", k="three")
    with pytest.raises(ParameterError, match="vae: epochs must be a positive integer, got 0"):
        anomalab.create("vae", epochs=0)
    with pytest.raises(ParameterError, match="has no parameter 'kk'"):
        anomalab.create("knn", kk=3)
    assert anomalab.create("knn", k="3").k == 3  # strings from a command line are converted
    assert anomalab.create("vae", lr=1).lr == 1.0


# ---- errors that tell a mistake from a bug --------------------------------------------------------
def test_a_bug_is_reported_as_a_bug(mvtec_tree, tmp_path, monkeypatch):
    import anomalab.runs

    def broken(*a, **k):
        raise TypeError("unexpected keyword argument 'step'")

    monkeypatch.setattr(anomalab.runs, "fit_run", broken)
    code, text = cli("fit", "knn", "--data", mvtec_tree, "--out", tmp_path / "r")
    assert code == 1 and "bug in anomalab" in text and "TypeError" in text and "Traceback" not in text
    code, text = cli("-v", "fit", "knn", "--data", mvtec_tree, "--out", tmp_path / "r")
    assert code == 1 and "Traceback" in text


def test_report_refuses_a_folder_that_is_not_a_complete_run(tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    code, text = cli("report", half)
    assert code == 2 and "not a complete anomalab run folder" in text


# ---- the other writers -----------------------------------------------------------------------------
def test_report_out_is_not_replaced_without_overwrite(old_run, tmp_path):
    page = tmp_path / "existing.html"
    page.write_text("my page")
    code, text = cli("report", old_run, "--out", page)
    assert code == 2 and "--overwrite" in text and page.read_text() == "my page"
    assert cli("report", old_run, "--out", page, "--overwrite")[0] == 0
    assert "<html>" in page.read_text()
    code, text = cli("report", old_run, "--out", old_run / "detector" / "x.html")
    assert code == 2 and "input" in text


def test_score_and_evaluate_outputs_follow_the_rule(mvtec_tree, old_run, tmp_path):
    good = mvtec_tree / "test" / "good"
    code, text = cli("score", old_run, good, "--out", good / "scores.csv")
    assert code == 2 and "input" in text and not (good / "scores.csv").exists()
    existing = tmp_path / "e.json"
    existing.write_text("{}")
    code, text = cli("evaluate", old_run, "--data", mvtec_tree, "--out", existing)
    assert code == 2 and existing.read_text() == "{}"


def test_two_exports_in_one_folder_keep_their_own_metadata(mvtec_tree, tmp_path):
    pytest.importorskip("onnxruntime")
    import anomalab
    from anomalab.export import OnnxScorer

    a_run, b_run = tmp_path / "a_run", tmp_path / "b_run"
    assert cli("fit", "knn", "k=1", "--data", mvtec_tree, "--out", a_run, "--no-figures")[0] == 0
    assert cli("fit", "pca", "n_components=2", "--data", mvtec_tree, "--out", b_run, "--no-figures")[0] == 0
    models = tmp_path / "models"
    assert cli("export", a_run, "--out", models / "a.onnx")[0] == 0
    assert cli("export", b_run, "--out", models / "b.onnx")[0] == 0
    a, b = OnnxScorer(models / "a.onnx"), OnnxScorer(models / "b.onnx")
    assert a.meta["name"] == "knn" and b.meta["name"] == "pca"
    assert a.meta["threshold"]["value"] == anomalab.load(a_run).threshold_.value
    assert b.meta["threshold"]["value"] == anomalab.load(b_run).threshold_.value
    code, text = cli("export", a_run, "--out", models / "b.onnx")
    assert code == 2 and "--overwrite" in text and OnnxScorer(models / "b.onnx").meta["name"] == "pca"


def test_make_dataset_replaces_only_what_it_built(tmp_path, user_folder):
    root = tmp_path / "ds"
    args = ["make-dataset", "textures", "--categories", "brick", "--size", "16", "--n-train", "2",
            "--n-test-good", "1", "--n-test-per-defect", "1"]
    assert cli(*args, "--out", root)[0] == 0
    built = files_of(root / "brick")
    code, text = cli(*args, "--out", root)
    assert code == 2 and "--overwrite" in text
    assert cli(*args, "--out", root, "--overwrite", "--seed", "1")[0] == 0
    assert files_of(root / "brick") != built
    mine = tmp_path / "mine"
    copy_run(user_folder, mine / "brick")
    before = files_of(mine)
    code, text = cli(*args, "--out", mine, "--overwrite")
    assert code == 2 and "not an anomalab" in text and files_of(mine) == before


def test_demo_refuses_an_existing_folder(user_folder, old_run):
    before = files_of(user_folder)
    code, text = cli("demo", "--out", user_folder)
    assert code == 2 and files_of(user_folder) == before
    before = files_of(old_run)
    code, text = cli("demo", "--out", old_run)
    assert code == 2 and "--overwrite" in text and files_of(old_run) == before


def test_generate_never_writes_into_its_images(tmp_path):
    from anomalab.generate.beta_vaegan.generate import output_names

    assert output_names(["good/a.png", "good/a.jpg", "good/b.png"]) == ["a.png.png", "a.jpg.png", "b.png"]
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(b"x")
    run = tmp_path / "gen_run"
    run.mkdir()
    for out in (images, images / "sub"):
        code, text = cli("generate", run, "--images", images, "--out", out)
        assert code == 2 and "input" in text, text
    assert sorted(p.name for p in images.iterdir()) == ["a.png"]




APPENDER = """
import sys
from anomalab.runs.store import ResultStore
store = ResultStore(sys.argv[1], key=("writer", "i"))
print("ready", flush=True)
for i in range(int(sys.argv[3])):
    store.add({"writer": sys.argv[2], "i": i, "payload": sys.argv[2] * 200_000})
"""


def test_result_store_appends_wait_for_the_file_lock_so_two_processes_can_share_it(tmp_path):
    import fcntl

    from anomalab.runs.store import ResultStore

    path = tmp_path / "results.jsonl"
    path.touch()
    with path.open("a") as held:  # another writer mid-append
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = subprocess.Popen([sys.executable, "-c", APPENDER, str(path), "w", "1"], stdout=subprocess.PIPE,
                                   text=True)
        assert waiting.stdout.readline() == "ready\n"  # about to append
        time.sleep(2)
        assert waiting.poll() is None and path.stat().st_size == 0  # blocked on the lock, nothing written
        fcntl.flock(held, fcntl.LOCK_UN)
    assert waiting.wait(timeout=60) == 0 and len(path.read_text().splitlines()) == 1
    path.unlink()
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), w, "40"], stdout=subprocess.DEVNULL)
             for w in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole
    assert len(rows) == 80 and all(r["payload"] == r["writer"] * 200_000 for r in rows)
    assert len(ResultStore(path, key=("writer", "i"))) == 80


def test_atomic_file_replaces_the_target_only_when_its_block_succeeds(tmp_path):
    from anomalab.runs.atomic import atomic_file

    target = tmp_path / "sub" / "state.pt"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"first" and hidden_siblings(target) == []  # old content kept, no temporary
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"second" and hidden_siblings(target) == []
