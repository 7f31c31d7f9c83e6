"""`anomalab demo` walks the user's path end to end: good crops -> make-defects -> fit -> predict -> report."""

from __future__ import annotations

import csv
import json

from conftest import cli


def test_demo_walks_the_path_and_refuses_to_replace_without_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text = cli("demo", "--detector", "knn")  # the cheap detector; make demo runs patchcore
    assert code == 0, text
    run, predictions = tmp_path / "runs" / "demo", tmp_path / "runs" / "demo-predictions"
    data = tmp_path / "runs" / "datasets" / "demo-brick"
    assert json.loads((data / "make_defects.json").read_text())  # built by make-defects from the good crops
    assert len(list((data / "train" / "good").iterdir())) == 80 and len(list((data / "test" / "good").iterdir())) == 20
    ev = json.loads((run / "evaluation.json").read_text())
    counts = ev["extra"]["counts"]
    assert counts["caught"] + counts["missed"] == 80 and counts["false_alarms"] + counts["passed"] == 20
    assert f"image AUROC {ev['metrics']['image_auroc']:.3f}" in text and "kNN baseline" in text
    rows = list(csv.DictReader((predictions / "predictions.csv").open()))
    assert len(rows) == 100 and sum(r["verdict"] == "anomalous" for r in rows) == counts["caught"] + counts[
        "false_alarms"]
    assert (predictions / "index.html").is_file() and (run / "report.html").is_file()
    before = (run / "detector" / "detector.json").read_text()
    code, text = cli("demo", "--detector", "knn")
    assert code == 2 and "--overwrite" in text and (run / "detector" / "detector.json").read_text() == before
    assert cli("demo", "--detector", "knn", "--overwrite")[0] == 0
