"""`anomalab experiment metric_textures --mvtec-root DIR`: the source's four metric-learning experiments
on any MVTec-layout categories, checked on a tiny tree built here (two categories, two defect classes).

What each experiment trained on is recorded by spies on the detector (classes of experiment 1, the
moved defect images of experiment 2, the generator calls of experiments 3 and 4); every stored AUROC is
recomputed with scikit-learn from the scores and from labels read off the tree's folders with PIL."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from conftest import build_mvtec_tree, cli, write_png
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalab.detectors.metric import detector as metric_module
from anomalab.detectors.metric.detector import Metric
from anomalab.errors import ParameterError
from anomalab.experiments import metric_textures

SIZE = 32  # tree images and --image-size: no resizing, so test images match the files pixel for pixel
RUN = ["--image-size", SIZE, "--train-blocks", 1, "--epochs", 1, "--heads", "cosface", "--seeds", 0]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/{alpha,beta}: 8 good training images; test: 6 good, 6 'scratch', 4 'dent' (a dark square)."""
    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(3)
    for k, cat in enumerate(("alpha", "beta")):
        build_mvtec_tree(root / cat, n_train=8, size=SIZE)
        for i in range(4):
            img = 90 + 30 * k + rng.normal(0, 3, (SIZE, SIZE))
            img[10:18, 10:18] = 0
            write_png(root / cat / "test" / "dent" / f"{i:03d}.png", img)
            mask = np.zeros((SIZE, SIZE))
            mask[10:18, 10:18] = 255
            write_png(root / cat / "ground_truth" / "dent" / f"{i:03d}_mask.png", mask)
    return root


def files_of(root, cat):
    """{test file -> (pixels (H, W) in [0, 1], is defect)}, read with PIL."""
    out = {}
    for p in sorted((root / cat / "test").rglob("*.png")):
        out[p] = (np.asarray(Image.open(p), np.float32) / 255, p.parent.name != "good")
    return out


@pytest.fixture(scope="module")
def run(tree, tmp_path_factory):
    """One run of experiments 1-4 with per-category options, with spies on fit, score and the defects."""
    out = tmp_path_factory.mktemp("out")
    seen = {"fit": [], "score": [], "defects": []}
    fit, score = Metric.fit, Metric.score
    defects = dict(metric_module.DEFECTS)

    def spy_fit(self, train):
        seen["fit"].append((self.mode, train.images.clone(), None if train.classes is None else train.classes.clone(),
                            None if train.labels is None else train.labels.clone()))
        return fit(self, train)

    def spy_score(self, images, *a, **k):
        s = score(self, images, *a, **k)
        seen["score"].append((self.mode, images.clone(), s.clone()))
        return s

    def recorder(name):
        @functools.wraps(defects[name])  # keeps the generator's signature, which the options are checked on
        def gen(image, rng, **options):
            seen["defects"].append((name, options))
            return defects[name](image, rng, **options)
        return gen

    mp = pytest.MonkeyPatch()
    mp.setattr(Metric, "fit", spy_fit)
    mp.setattr(Metric, "score", spy_score)
    for name in defects:
        mp.setitem(metric_module.DEFECTS, name, recorder(name))
    try:
        metric_textures.main(["--mvtec-root", str(tree), "--categories", "alpha", "beta", "--out", str(out),
                              "--experiments", "1", "2", "3", "4", *map(str, RUN),
                              "--binary-defect", "beta=scratch", "--binary-count", "3",
                              "--tuned-defects", "alpha=scratch", "beta=blob,missing_patch",
                              "--defect-option", "alpha:scratch.width=1,2", "blob.radius=4,6"])
    finally:
        mp.undo()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows, seen


def test_every_experiment_runs_on_every_category(run):
    _, rows, _ = run
    assert sorted((r["experiment"], r["category"]) for r in rows) == [
        (e, c) for e in (1, 2, 3, 4) for c in ("alpha", "beta")]
    n_test = {(r["experiment"], r["category"]): r["n_test"] for r in rows}
    assert n_test[(3, "alpha")] == n_test[(1, "beta")] == 16  # 6 good + 6 scratch + 4 dent
    assert n_test[(2, "alpha")] == 13 and n_test[(2, "beta")] == 13  # 3 images moved into training


def test_multiclass_trains_one_class_per_category(run):
    _, _, seen = run
    (mode, images, classes, _), = [f for f in seen["fit"] if f[0] == "multiclass"]
    assert len(images) == 16 and classes.tolist() == [0] * 8 + [1] * 8


def test_binary_moves_the_chosen_class_of_each_category(run, tree):
    _, rows, seen = run
    variants = {r["category"]: r["variant"] for r in rows if r["experiment"] == 2}
    # alpha: no choice given, its first defect class alphabetically (dent); beta: scratch, as asked
    assert variants == {"alpha": "dent x 3", "beta": "scratch x 3"}
    fits = [f for f in seen["fit"] if f[0] == "binary"]
    assert len(fits) == 2
    for (_, images, _, labels), cat, cls in zip(fits, ("alpha", "beta"), ("dent", "scratch"), strict=True):
        assert labels.tolist() == [0] * 8 + [1] * 3
        moved = {p.parent.name for p, (px, _) in files_of(tree, cat).items()
                 for x in images[8:] if np.abs(x[0].numpy() - px).max() < 1e-6}
        assert moved == {cls}  # the three defect images come from that class's folder only


def test_tuned_synthesis_follows_the_per_category_options(run):
    out, rows, seen = run
    kinds = [name for name, _ in seen["defects"]]
    # experiment 3: the scar only, with its own options; experiment 4: the kinds named per category
    assert {(n, json.dumps(o)) for n, o in seen["defects"] if n == "scar"} == {("scar", "{}")}
    assert set(kinds) == {"scar", "scratch", "blob", "missing_patch"}
    assert {json.dumps(o) for n, o in seen["defects"] if n == "scratch"} == {json.dumps({"width": [1, 2]})}
    assert {json.dumps(o) for n, o in seen["defects"] if n == "blob"} == {json.dumps({"radius": [4, 6]})}
    assert {json.dumps(o) for n, o in seen["defects"] if n == "missing_patch"} == {"{}"}
    variants = {r["category"]: r["variant"] for r in rows if r["experiment"] == 4}
    assert variants == {"alpha": 'scratch {"scratch": {"width": [1, 2]}}',
                        "beta": 'blob,missing_patch {"blob": {"radius": [4, 6]}}'}
    table = (out / "results.md").read_text()
    assert "MVTec AD" in table and "scratch x 3" in table and "| screw | 0.623 | 0.910 | not run | not run |" in table
    assert (out / "auroc_heatmap.png").is_file()


def test_every_auroc_is_recomputed_from_scores_and_folder_labels(run, tree):
    _, rows, seen = run
    truth = {c: files_of(tree, c) for c in ("alpha", "beta")}
    calls = iter(seen["score"])
    for r in rows:  # rows were stored in scoring order
        mode, images, scores = next(calls)
        assert mode == r["mode"] and len(images) == r["n_test"]
        labels = []
        for x in images[:, 0].numpy():
            match = [d for px, d in truth[r["category"]].values() if np.abs(px - x).max() < 1e-6]
            assert len(match) >= 1
            labels.append(match[0])
        assert roc_auc_score(labels, scores.numpy()) == pytest.approx(r["image_auroc"], abs=1e-9)
    # negative control: labels shuffled break the agreement for some cell
    rng = np.random.default_rng(0)
    mode, images, scores = seen["score"][0]
    shuffled = rng.permutation([d for _, d in truth[rows[0]["category"]].values()])
    assert roc_auc_score(shuffled, scores.numpy()) != pytest.approx(rows[0]["image_auroc"], abs=1e-9)


def test_a_rerun_skips_finished_cells(run, tree):
    out, rows, _ = run
    n = len(rows)
    metric_textures.main(["--mvtec-root", str(tree), "--categories", "alpha", "beta", "--out", str(out),
                          "--experiments", "1", "3", *map(str, RUN)])
    assert len((out / "results.jsonl").read_text().splitlines()) == n


@pytest.mark.parametrize("args, message", [
    (["--categories", "gamma"], "no category folder"),
    (["--categories", "alpha", "--binary-defect", "beta=dent"], "not one of --categories"),
    (["--categories", "alpha", "--tuned-defects", "glitter"], "unknown tuned_defects"),
    (["--categories", "alpha", "--defect-option", "scratch.depth=3"], "has no option depth"),
    (["--categories", "alpha", "--tuned-defects", "scratch", "--defect-option", "alpha:blob.radius=4"],
     "blob is not among alpha's tuned defects"),
    (["--categories", "alpha", "--tuned-defects", "scratch", "--defect-option", "blob.radius=4"],
     "no category's tuned defects include blob"),
])
def test_bad_options_fail_in_one_line(tree, tmp_path, args, message):
    with pytest.raises(ParameterError, match=message):
        metric_textures.parse_args(["--mvtec-root", str(tree), "--out", str(tmp_path), *args])
    code, output = cli("experiment", "metric_textures", "--mvtec-root", tree, "--out", tmp_path, *args)
    assert code != 0 and message in output and "Traceback" not in output


def test_binary_class_must_exist(tree, tmp_path):
    code, output = cli("experiment", "metric_textures", "--mvtec-root", tree, "--categories", "alpha",
                       "--experiments", "2", "--binary-defect", "crack", "--out", tmp_path, *RUN)
    assert code != 0 and "alpha has no defect class 'crack'" in output


def test_defaults_name_the_source_categories_and_texture_defect(tmp_path):
    args = metric_textures.parse_args(["--out", str(tmp_path)])
    assert args.categories == ["brick", "grass", "gravel"]
    assert all(p == (("scratch", "blob", "missing_patch", "intensity_shift"), {}) for p in args.plan.values())
    assert metric_textures.SOURCE_CATEGORIES == ("capsule", "carpet", "leather", "cable")


def test_experiment_zero_trains_nothing(tree, tmp_path):
    metric_textures.main(["--mvtec-root", str(tree), "--categories", "alpha", "--experiments", "0",
                          "--out", str(tmp_path), "--image-size", str(SIZE), "--train-blocks", "1"])
    (row,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert row["experiment"] == 0 and row["epochs"] == 0 and row["final_train_accuracy"] is None
