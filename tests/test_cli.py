"""The CLI as a user runs it, on a tiny MVTec-layout tree built here."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomalab.cli import main


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """<root>/widget: 24 smooth good images, test: 6 good + 6 'scratch' with masks, 16x16 gray."""
    root = tmp_path_factory.mktemp("data") / "widget"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]

    def good():
        return 100 + 40 * np.sin(xx / 3 + rng.uniform(0, 6)) + rng.normal(0, 3, (16, 16))

    for i in range(24):
        _png(root / "train" / "good" / f"{i:03d}.png", good())
    for i in range(6):
        _png(root / "test" / "good" / f"{i:03d}.png", good())
        img, mask = good(), np.zeros((16, 16))
        img[3:13, 7:9] = 255
        mask[3:13, 7:9] = 255
        _png(root / "test" / "scratch" / f"{i:03d}.png", img)
        _png(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_list_names_every_detector():
    import anomalab

    code, out = run("list")
    assert code == 0
    for name in anomalab.list_detectors():
        assert name in out


def test_fit_score_evaluate_report_round_trip(tree, tmp_path):
    out = tmp_path / "run"
    code, text = run("fit", "knn", "k=3", "--data", tree, "--out", out)
    assert code == 0, text
    assert "image_auroc=1.0000" in text
    for f in ("config.json", "history.json", "evaluation.json", "report.html", "score_histogram.png",
              "hardest_cases.png", "detector/weights.safetensors", "detector/detector.json"):
        assert (out / f).is_file(), f
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["metrics"]["pixel_auroc"] > 0.9
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html

    code, text = run("score", out, tree / "test" / "scratch", tree / "test" / "good" / "000.png")
    assert code == 0, text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 7
    assert [r["verdict"] for r in rows[:6]] == ["anomalous"] * 6 and rows[6]["verdict"] == "normal"

    assert rows[0]["name"] == str(tree / "test" / "scratch" / "000.png")

    code, text = run("score", out, tree / "test" / "good", "--format", "json")
    assert code == 0 and json.loads(text)["threshold"]["max_fpr"] == 0.01
    folders = (tree / "test" / "good", tree / "test" / "scratch")
    halves = [run("score", out, *folders, "--shard", f"{k}/2")[1] for k in (0, 1)]
    names = [[r["name"] for r in csv.DictReader(io.StringIO(h))] for h in halves]
    assert len(names[0]) == len(names[1]) == 6
    assert sorted(names[0] + names[1]) == sorted(str(p) for p in (tree / "test").rglob("*.png"))

    code, text = run("evaluate", out, "--data", tree, "--normalize", "minmax")
    assert code == 0 and "image_auroc\t1.0000" in text

    code, text = run("report", out, out, "--out", tmp_path / "both.html")
    assert code == 0 and (tmp_path / "both.html").is_file()

    code, text = run("export", out, "--out", tmp_path / "m.onnx")
    assert code == 0 and (tmp_path / "m.onnx").is_file() and (tmp_path / "m.onnx.json").is_file()
    code, text = run("export", out, "--out", tmp_path / "m.onnx")
    assert code == 2 and "--overwrite" in text


def test_existing_run_is_not_overwritten(tree, tmp_path):
    out = tmp_path / "run"
    assert run("fit", "pca", "n_components=2", "--data", tree, "--out", out, "--no-figures")[0] == 0
    before = (out / "detector" / "weights.safetensors").read_bytes()
    code, text = run("fit", "knn", "--data", tree, "--out", out)
    assert code == 2 and text.startswith("error:") and "--overwrite" in text and len(text.splitlines()) == 1
    assert (out / "detector" / "weights.safetensors").read_bytes() == before
    assert run("fit", "knn", "--data", tree, "--out", out, "--overwrite", "--no-figures")[0] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (("fit", "knn", "--data", "/no/such/folder", "--out", "{tmp}/r"), "not found"),
        (("fit", "nosuch", "--data", "mnist:anomaly=0", "--out", "{tmp}/r"), "unknown detector"),
        (("fit", "knn", "bogus=1", "--data", "mnist:anomaly=0", "--out", "{tmp}/r"), "no parameter"),
        (("fit", "knn", "--data", "mnist:seed=1", "--out", "{tmp}/r"), "anomaly"),
        (("score", "{tmp}", "{tmp}"), "is not a complete saved detector"),
        (("experiment", "nosuch"), "unknown experiment"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    code, text = run(*(a.format(tmp=tmp_path) for a in args))
    assert code == 2, text
    assert text.startswith("error:") and message in text


def test_empty_folder_and_corrupt_files(tree, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = run("fit", "knn", "--data", empty, "--out", tmp_path / "r")
    assert code == 2 and "no image files" in text
    assert not (tmp_path / "r").exists()
    out = tmp_path / "run"
    assert run("fit", "knn", "--data", tree, "--out", out, "--no-figures")[0] == 0
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in sorted((tree / "test" / "good").iterdir())[:2]:
        (mixed / f.name).write_bytes(f.read_bytes())
    (mixed / "broken.png").write_bytes(b"not an image at all")
    code, text = run("score", out, mixed)
    assert code == 0 and len(list(csv.DictReader(io.StringIO(text)))) == 2
    code, text = run("score", out, mixed, "--strict")
    assert code == 2 and "broken.png" in text


def test_experiment_without_name_lists_them():
    code, text = run("experiment")
    assert code == 0 and "latent_scatter" in text and "vae_repair" in text


def test_help_works_everywhere():
    for cmd in (["--help"], ["fit", "--help"], ["score", "--help"], ["experiment", "--help"],
                ["experiment", "latent_scatter", "--help"]):
        code, text = run(*cmd)
        assert code == 0, (cmd, text)
        assert "error" not in text.lower().split("usage")[0] and "usage" in text.lower(), (cmd, text)
