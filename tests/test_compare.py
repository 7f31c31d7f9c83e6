"""`anomalab compare`: the leaderboard's columns and order, mean ± std against the run folders, resuming,
failing cells, the output rule, several data sets, isolated cells and the command line."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from conftest import cli

import anomalab.compare as cmp
from anomalab.errors import DataError, ParameterError, RunFolderError, UnknownNameError
from anomalab.runs.store import ResultStore

SEEDS = [0, 1]


def run(tree, out, **kw):
    kw.setdefault("detectors", "knn,pca")
    kw.setdefault("seeds", SEEDS)
    return cmp.compare([str(tree)] if not isinstance(tree, list) else tree, out, isolate=False, figures=False,
                       **kw)


@pytest.fixture
def counted(monkeypatch):
    """fit_run, counting its calls as (detector, seed) pairs."""
    calls = []
    real = cmp.fit_run

    def counting(detector, params, data_spec, out, **kw):
        calls.append((detector, params.get("seed")))
        return real(detector, params, data_spec, out, **kw)

    monkeypatch.setattr(cmp, "fit_run", counting)
    return calls


@pytest.fixture(scope="module")
def done(mvtec_tree, tmp_path_factory):
    """One finished comparison: knn (deterministic: one cell) and pca x 2 seeds on the tiny MVTec tree."""
    out = tmp_path_factory.mktemp("cmp") / "board"
    return out, run(mvtec_tree, out)


def test_columns(done):
    out, board = done
    header = next(csv.reader((out / "leaderboard.csv").open()))
    for col in ("data", "rank", "detector", "image_auroc_mean", "image_auroc_std", "aupr_mean", "pixel_auroc_mean",
                "aupro_mean", "false_alarm_rate_mean", "catch_rate_mean", "auroc_scratch", "fit_s",
                "score_images_per_s", "peak_rss_mb", "model_mb", "note", "errors", "reports"):
        assert col in header, col
    page = (out / "leaderboard.html").read_text()
    table = page[page.index("<table>"):page.index("</table>")]
    heads = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th[^>]*>(.*?)</th>", table)]
    # one defect type: its AUROC is the image AUROC, shown in the CSV and JSON only (two types: below)
    assert heads == ["#", "detector (family)", "seeds done", "image AUROC", "note", "AUPR", "pixel AUROC", "AUPRO",
                     "at the saved threshold", "cost on this machine", "reports", "false alarms", "caught", "fit s",
                     "images/s scored", "peak MB", "model MB"]
    assert "Recommendation" in page
    assert "<script" not in page and "<link" not in page and "http" not in page  # self-contained
    for link in re.findall(r'href="([^"]+)"', page):
        assert (out / link).is_file(), link
    assert json.loads((out / "leaderboard.json").read_text())["recommendation"]["text"] == \
        board["recommendation"]["text"]
    assert (out / "compare.json").is_file() and (out / "leaderboard.md").is_file()


def test_runs_and_mean_std_match_the_run_folders(done, mvtec_tree):
    out, board = done
    runs = sorted(p.relative_to(out).as_posix() for p in (out / "runs").glob("*/*") if p.is_dir())
    assert runs == ["runs/widget/knn_s0", "runs/widget/pca_s0", "runs/widget/pca_s1"]
    rows = {e["detector"]: e for e in board["tables"][0]["rows"]}
    for det, seeds in (("knn", [0]), ("pca", SEEDS)):
        evs = [json.loads((out / f"runs/widget/{det}_s{s}/evaluation.json").read_text()) for s in seeds]
        for key, metric in (("image_auroc", "image_auroc"), ("aupr", "aupr"), ("pixel_auroc", "pixel_auroc"),
                            ("aupro", "aupro"), ("false_alarm_rate", "fpr_at_threshold"),
                            ("catch_rate", "tpr_at_threshold")):
            values = [ev["metrics"][metric] for ev in evs]
            assert rows[det][key]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert rows[det][key]["std"] == pytest.approx(np.std(values), abs=1e-12)
            assert rows[det][key]["n"] == len(seeds)
        scratch = [next(r["auroc"] for r in ev["extra"]["per_class"] if r["name"] == "scratch") for ev in evs]
        assert rows[det]["per_defect"]["scratch"]["mean"] == pytest.approx(np.mean(scratch))
        assert [r["report"] for r in rows[det]["reports"]] == [f"runs/widget/{det}_s{s}/report.html" for s in seeds]
        assert rows[det]["model_bytes"]["mean"] > 0 and rows[det]["fit_s"]["mean"] >= 0
    assert rows["knn"]["seeded"] is False and rows["pca"]["seeded"] is True
    line = next(r for r in csv.DictReader((out / "leaderboard.csv").open()) if r["detector"] == "pca")
    assert float(line["image_auroc_mean"]) == pytest.approx(rows["pca"]["image_auroc"]["mean"], abs=1e-5)


def _row(det, seed, auroc, status="ok", **kw):
    row = {"data": "d", "detector": det, "seed": seed, "budget": "standard", "spec_name": "d", "status": status,
           "image_auroc": auroc, "score_images_per_s": kw.pop("speed", 100.0),
           "per_defect": {"scratch": auroc, "blob": None if auroc is None else auroc - 0.1}}
    row.update(kw)
    return row


def _cells(dets, seeds=(0, 1)):
    return [{"data": "d", "detector": d, "seed": s, "budget": "standard", "spec_name": "d", "seeded": True}
            for d in dets for s in seeds]


def test_sorted_by_auroc_with_baseline_notes_and_recommendation(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl", key=cmp.KEY)
    for det, values, speed in (("knn", (0.80, 0.82), 500.0), ("pca", (0.70, 0.70), 900.0),
                               ("vae", (0.75, 0.77), 300.0), ("patchcore", (0.95, 0.97), 5.0)):
        for seed, v in enumerate(values):
            store.add(_row(det, seed, v, speed=speed))
    store.add(_row("padim", 0, None, status="failed", error="DataError: too small"))
    board = cmp.leaderboard(_cells(["knn", "pca", "vae", "patchcore", "padim"]), store, budget="standard",
                            seeds=[0, 1], min_images_per_s=20)
    rows = board["tables"][0]["rows"]
    assert [e["detector"] for e in rows] == ["patchcore", "knn", "vae", "pca", "padim"]
    aurocs = [e["image_auroc"]["mean"] for e in rows if e["image_auroc"]]
    assert aurocs == sorted(aurocs, reverse=True)
    notes = {e["detector"]: e["note"] for e in rows}
    assert notes["vae"].startswith("loses to knn (0.810)") and "pca" not in notes["vae"]
    assert notes["patchcore"] == "beats knn and pca" and notes["knn"] == "baseline"
    padim = rows[-1]
    assert padim["status"] == "partial" and padim["errors"] == [{"seed": 0, "error": "DataError: too small"}]
    rec = board["recommendation"]
    assert rec["best"] == "patchcore" and rec["best_fast"] == "knn"  # patchcore scores 5 images/s < 20
    assert "patchcore" in rec["text"] and "knn" in rec["text"] and "20 images/s" in rec["text"]
    assert "mean image AUROC" in rec["based_on"]
    assert rows[0]["per_defect"]["blob"]["mean"] == pytest.approx(0.86)
    page = cmp.leaderboard_html(board)
    assert "DataError: too small" in page and "loses to knn" in page
    assert "AUROC per defect type</th>" in page and "<th>blob</th><th>scratch</th>" in page


def test_resume_fits_nothing_then_only_a_deleted_cell(done, counted, mvtec_tree):
    out, board = done
    again = run(mvtec_tree, out)
    assert counted == []
    assert again["tables"][0]["rows"] == board["tables"][0]["rows"]
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = [line for line in lines if not (json.loads(line)["detector"] == "pca" and json.loads(line)["seed"] == 1)]
    assert len(kept) == len(lines) - 1
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    before = json.loads((out / "runs/widget/pca_s1/evaluation.json").read_text())["metrics"]
    third = run(mvtec_tree, out)
    assert counted == [("pca", 1)]
    assert json.loads((out / "runs/widget/pca_s1/evaluation.json").read_text())["metrics"] == before
    assert third["done"] == 3
    run(mvtec_tree, out, refit=True)
    assert sorted(counted[1:]) == [("knn", None), ("pca", 0), ("pca", 1)]


def test_cells_fitted_with_changed_defaults_are_named_and_refitted_only_when_asked(mvtec_tree, tmp_path, counted):
    out = tmp_path / "board"
    run(mvtec_tree, out)
    assert counted == [("knn", None), ("pca", 0), ("pca", 1)]
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:  # as if pca s1 had been fitted by a version with another default
        if r["detector"] == "pca" and r["seed"] == 1:
            r["params"]["n_components"] = 7 if r["params"].get("n_components") != 7 else 8
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    said = []
    run(mvtec_tree, out, echo=said.append)
    assert len(counted) == 3  # kept: a finished cell is not refitted unless asked
    note = next(line for line in said if "other parameters" in line)
    assert "pca s1 (n_components)" in note and "--refit-stale" in note and "knn" not in note
    run(mvtec_tree, out, refit_stale=True, echo=said.append)
    assert counted[3:] == [("pca", 1)]
    said.clear()
    run(mvtec_tree, out, echo=said.append)
    assert len(counted) == 4 and not any("other parameters" in line for line in said)


def test_an_interrupted_comparison_continues_where_it_stopped(mvtec_tree, tmp_path, monkeypatch, counted):
    counting = cmp.fit_run

    def interrupted(detector, params, data_spec, out, **kw):
        if detector == "pca" and params.get("seed") == 0:
            raise KeyboardInterrupt
        return counting(detector, params, data_spec, out, **kw)

    monkeypatch.setattr(cmp, "fit_run", interrupted)
    out = tmp_path / "board"
    with pytest.raises(KeyboardInterrupt):
        run(mvtec_tree, out)
    assert [r["detector"] for r in ResultStore(out / "results.jsonl", key=cmp.KEY)] == ["knn"]
    assert sorted(p.name for p in (out / "runs" / "widget").iterdir()) == ["knn_s0"]
    assert json.loads((out / "leaderboard.json").read_text())["done"] == 1  # the partial leaderboard
    monkeypatch.setattr(cmp, "fit_run", counting)
    board = run(mvtec_tree, out)
    assert counted == [("knn", None), ("pca", 0), ("pca", 1)] and board["done"] == 3


def test_a_failing_cell_is_recorded_and_the_others_finish(mvtec_tree, tmp_path, monkeypatch, counted):
    counting = cmp.fit_run

    def failing(detector, params, data_spec, out, **kw):
        if detector == "pca" and params.get("seed") == 0:
            raise RuntimeError("pca cannot handle this\nsecond line")
        return counting(detector, params, data_spec, out, **kw)

    monkeypatch.setattr(cmp, "fit_run", failing)
    out = tmp_path / "board"
    board = run(mvtec_tree, out)
    assert board["done"] == 2 and board["failed"] == 1
    rows = {(r["detector"], r["seed"]): r for r in ResultStore(out / "results.jsonl", key=cmp.KEY)}
    assert rows[("pca", 0)]["status"] == "failed"
    assert rows[("pca", 0)]["error"] == "RuntimeError: pca cannot handle this second line"
    assert rows[("knn", 0)]["status"] == rows[("pca", 1)]["status"] == "ok"
    assert not (out / "runs/widget/pca_s0").exists() and (out / "runs/widget/pca_s1/run.json").is_file()
    pca = next(e for e in board["tables"][0]["rows"] if e["detector"] == "pca")
    assert pca["status"] == "partial" and pca["image_auroc"]["n"] == 1 and "1 of 2 cells failed" in pca["note"]
    assert "RuntimeError: pca cannot handle this second line" in (out / "leaderboard.html").read_text()
    assert "RuntimeError" in (out / "leaderboard.csv").read_text()
    n = len(counted)
    run(mvtec_tree, out)  # a failed cell counts as done ...
    assert len(counted) == n
    monkeypatch.setattr(cmp, "fit_run", counting)
    fixed = run(mvtec_tree, out, retry_failed=True)  # ... until asked to retry it
    assert counted[n:] == [("pca", 0)] and fixed["failed"] == 0


def test_output_rule(mvtec_tree, tmp_path, counted):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match="not an anomalab compare folder"):
            run(mvtec_tree, other, overwrite=overwrite)
    assert (other / "notes.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1
    with pytest.raises(RunFolderError, match="input"):
        run(mvtec_tree, mvtec_tree / "board")
    out = tmp_path / "board"
    run(mvtec_tree, out, detectors="knn", seeds=[0])
    assert len(counted) == 2
    with pytest.raises(RunFolderError, match="--budget standard comparison"):
        run(mvtec_tree, out, detectors="knn", seeds=[0], budget="paper")
    (out / "stale.txt").write_text("from before")
    run(mvtec_tree, out, detectors="knn", seeds=[0], overwrite=True)
    assert len(counted) == 4 and not (out / "stale.txt").exists() and (out / "compare.json").is_file()
    assert not list(tmp_path.glob(".board*old*"))
    assert len(ResultStore(out / "results.jsonl", key=cmp.KEY)) == 2


def test_spec_without_test_set_names_make_defects(mvtec_tree, tmp_path):
    with pytest.raises(DataError, match="anomalab make-defects"):
        run(mvtec_tree / "train" / "good", tmp_path / "board")
    assert not (tmp_path / "board").exists()


def test_several_data_sets_get_a_summary_row(mvtec_tree, tmp_path):
    out = tmp_path / "board"
    board = run([str(mvtec_tree), f"{mvtec_tree},size=12"], out, seeds=[0])
    assert [t["name"] for t in board["tables"]] == ["widget", "widget-size12"]
    assert (out / "runs/widget-size12/pca_s0/run.json").is_file()
    summary = {e["detector"]: e for e in board["summary"]}
    assert set(summary) == {"knn", "pca"}
    per = [next(e for e in t["rows"] if e["detector"] == "pca")["image_auroc"]["mean"] for t in board["tables"]]
    assert summary["pca"]["image_auroc"]["mean"] == pytest.approx(np.mean(per))
    assert summary["pca"]["by_category"] == dict(zip(["widget", "widget-size12"], per))
    alls = [r for r in csv.DictReader((out / "leaderboard.csv").open()) if r["data"] == "all"]
    assert {r["detector"] for r in alls} == {"knn", "pca"}
    assert "All data sets" in (out / "leaderboard.html").read_text()


def test_isolated_cells_record_their_own_peak_memory(mvtec_tree, tmp_path):
    ballast = np.ones(40_000_000)  # 320 MB in this process: a cell's peak must not start from ours
    ours = cmp._max_rss_mb()
    out = tmp_path / "board"
    board = cmp.compare([str(mvtec_tree)], out, detectors="knn", seeds=[0], figures=False)
    del ballast
    rows = ResultStore(out / "results.jsonl", key=cmp.KEY).rows()
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["isolated"] for r in rows)
    assert all(0 < r["base_rss_mb"] <= r["peak_rss_mb"] < ours - 150 for r in rows), (ours, rows)
    assert board["tables"][0]["rows"][0]["peak_rss_mb"]["mean"] > 0
    assert "resident set" in (out / "leaderboard.html").read_text()


def test_detectors_budgets_and_specs():
    assert cmp.select_detectors(family="ae") == ["knn", "pca", "conv_ae", "vae"]
    assert cmp.select_detectors("pca,gaussian") == ["knn", "pca", "gaussian"]
    with pytest.raises(ParameterError, match="not both"):
        cmp.select_detectors("knn", "gan")
    with pytest.raises(UnknownNameError, match="unknown detector"):
        cmp.select_detectors("knn,nope")
    # quick: vae trains ~300 steps: 1,000 images, 100 held out, batch 128 -> 8 steps per epoch -> 38 epochs
    assert cmp.budget_params("vae", "quick", n_train=1000) == {"epochs": 38}
    assert cmp.budget_params("knn", "quick") == {} and cmp.budget_params("vae", "standard") == {}
    assert cmp.budget_params("ganomaly", "paper") == {"epochs": 15}
    assert cmp.fit_spec("textures:brick", "vae", "quick") == "textures:brick,size=32"
    assert cmp.fit_spec("textures:brick,size=64", "vae", "quick") == "textures:brick,size=64"
    assert cmp.fit_spec("mnist:anomaly=3", "vae", "quick") == "mnist:anomaly=3"
    assert cmp.spec_name("mnist:anomaly=3,seed=1") == "mnist-anomaly3-seed1"
    assert cmp.spec_name("textures:brick") == "textures-brick"
    with pytest.raises(ParameterError, match="seeds"):
        cmp.compare(["textures:brick"], "unused", seeds=[-1])


def test_cli(mvtec_tree, tmp_path):
    out = tmp_path / "board"
    code, output = cli("compare", "--data", mvtec_tree, "--detectors", "pca", "--seeds", "0", "1", "--out", out,
                       "--in-process", "--no-figures")
    assert code == 0, output
    assert "leaderboard:" in output and "Best quality" in output
    assert sorted(p.name for p in (out / "runs" / "widget").iterdir()) == ["knn_s0", "pca_s0", "pca_s1"]
    code, output = cli("compare", "--data", mvtec_tree, "--out", tmp_path / "b2", "7")
    assert code == 2 and "--seeds" in output
