"""Thresholds you can trust and change: the normal scores a run keeps (calibration.json), cross-fitting on
small sets, the small-set and near-duplicate warnings, `anomalab threshold`, and old records still loading."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil

import numpy as np
import pytest
from conftest import cli
from PIL import Image

from anomalab.thresholds import choose_folds, support_warning
from anomalab.types import Threshold

PLAIN = ("detector/weights.safetensors", "config.json", "history.json")
THRESHOLD_RECORDS = {"calibration.json", "detector/detector.json", "evaluation.json", "report.html"}


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def scores_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def calibration(run) -> dict:
    return json.loads((run / "calibration.json").read_text())


@pytest.fixture(scope="module")
def digit_folders(mnist, tmp_path_factory):
    """Plain folders of good images (28x28 real '1's): `distinct` 60 different digits; `twins` 30 digits,
    each saved twice (an exact near-duplicate, as overlapping crops or video frames would be); `others` 20
    more digits, in neither."""
    root = tmp_path_factory.mktemp("digits")
    ones = (mnist.subset(mnist.classes == 1).images[:, 0].numpy() * 255).round().astype(np.uint8)
    distinct, twins, others = root / "distinct", root / "twins", root / "others"
    for folder in (distinct, twins, others):
        folder.mkdir()
    for i in range(60):
        Image.fromarray(ones[i]).save(distinct / f"{i:03d}.png")
    for i in range(30):
        Image.fromarray(ones[100 + i]).save(twins / f"{i:03d}a.png")
        Image.fromarray(ones[100 + i]).save(twins / f"{i:03d}b.png")
    for i in range(20):
        Image.fromarray(ones[200 + i]).save(others / f"{i:03d}.png")
    return distinct, twins, others


def fit(data, out, *args):
    code, text = cli("fit", "knn", "k=1", "--data", data, "--out", out, "--no-figures", *args)
    assert code == 0, text
    return text


@pytest.fixture(scope="module")
def tree_run(mvtec_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "knn"
    code, text = cli("fit", "knn", "k=3", "--data", mvtec_tree, "--out", out)
    assert code == 0, text
    return out


# ---- records ------------------------------------------------------------------------------------------
def test_old_threshold_records_still_load_and_new_ones_round_trip(tree_run, tmp_path):
    import anomalab
    from anomalab.errors import ParameterError

    old = Threshold.from_dict({"value": 1.5, "max_fpr": 0.01, "n_normal": 6})
    assert (old.method, old.basis, old.pixel_value, old.created) == ("quantile", "normal", None, None)
    new = Threshold(value=2.0, max_fpr=0.25, n_normal=4, method="value", basis="crossfit", pixel_value=0.3,
                    created="2025-01-01T00:00:00Z")
    assert Threshold.from_dict(new.to_dict()) == new
    assert Threshold.from_dict({**new.to_dict(), "n_normal": 0, "max_fpr": 0.0}).n_normal == 0  # by hand, no scores
    for bad, message in (({**new.to_dict(), "colour": 1}, "exactly the keys"),
                         ({**new.to_dict(), "method": "guess"}, "method"),
                         ({**new.to_dict(), "basis": "test"}, "basis"),
                         ({**new.to_dict(), "pixel_value": float("inf")}, "pixel_value"),
                         ({"value": 1.0, "max_fpr": 0.01, "n_normal": 0}, "n_normal")):
        with pytest.raises(ParameterError, match=message):
            Threshold.from_dict(bad)
    run = tmp_path / "old"
    shutil.copytree(tree_run, run)
    meta_file = run / "detector" / "detector.json"
    meta = json.loads(meta_file.read_text())
    meta["threshold"] = {"value": 0.5, "max_fpr": 0.01, "n_normal": 2}  # as written before the new fields
    meta_file.write_text(json.dumps(meta, indent=1))
    assert anomalab.load(run).threshold_ == Threshold(value=0.5, max_fpr=0.01, n_normal=2)


def test_the_small_set_warning_fires_for_6_scores_at_1_percent_only():
    assert support_warning(6, 0.01) is not None and "1/6" in support_warning(6, 0.01)
    assert support_warning(500, 0.01) is None
    assert support_warning(100, 0.01) is None and support_warning(99, 0.01) is not None
    assert support_warning(500, 0.0) is not None  # no finite set supports a zero rate


def test_the_automatic_rule_cross_fits_cheap_detectors_on_small_sets():
    from anomalab.errors import ParameterError

    assert choose_folds("knn", 60, None) == 5 and choose_folds("pca", 199, None) == 5
    assert choose_folds("gaussian", 3, None) == 3
    assert choose_folds("knn", 200, None) == 0 and choose_folds("vae", 60, None) == 0
    assert choose_folds("vae", 60, 4) == 4 and choose_folds("knn", 60, 0) == 0
    for bad in (1, -1, True, 2.5):
        with pytest.raises(ParameterError, match="calib-folds"):
            choose_folds("knn", 60, bad)


def test_overlapping_crops_are_near_duplicates_for_detectors_that_ignore_position():
    import torch

    import anomalab
    from anomalab.thresholds import DupSpace, dup_space

    rng = np.random.default_rng(0)
    photo = torch.from_numpy(rng.random((1, 1, 180, 180))).float()
    photo = torch.nn.functional.avg_pool2d(photo, 3, stride=1)[0, 0]  # a fine random texture
    crops = torch.stack([photo[y : y + 64, x : x + 64] for y, x in ((0, 0), (8, 12), (100, 100))])[:, None]
    shifted, aligned = DupSpace(shifted=True), DupSpace(shifted=False)
    for space, overlapping_is_duplicate in ((shifted, True), (aligned, False)):
        f = space.features(crops)
        r = space.block(f[:1], f, space.variance(f))[0]
        assert float(r[0]) < 1e-3  # an image is its own duplicate
        assert (float(r[1]) < 0.1) == overlapping_is_duplicate  # the crop shifted by (8, 12) px
        assert float(r[2]) > 0.3  # a crop from elsewhere
    assert dup_space(anomalab.create("gaussian")).shifted and dup_space(anomalab.create("metric")).shifted
    assert not dup_space(anomalab.create("knn")).shifted and not dup_space(anomalab.create("pca")).shifted


# ---- calibration at fit time ------------------------------------------------------------------------
def test_hold_out_keeps_its_scores_and_warns_for_6_scores_at_1_percent(digit_folders, tmp_path):
    import anomalab
    from anomalab.data.specs import load_spec
    from anomalab.runs.fit import calibration_split

    distinct, _, _ = digit_folders
    run = tmp_path / "hold"
    text = fit(distinct, run, "--calib-folds", "0")
    record = calibration(run)
    assert record["basis"] == "holdout" and len(record["scores"]) == 6
    det = anomalab.load(run)
    assert det.threshold_.n_normal == 6 and det.threshold_.basis == "holdout"
    assert "rests on 6 normal scores" in text and "warning:" in text
    assert any("rests on 6 normal scores" in w for w in record["warnings"])
    fit_set, calib = calibration_split(load_spec(str(distinct))[0], 0.1, seed=0)
    assert record["names"] == calib.names
    np.testing.assert_array_equal(record["scores"], det.score(calib.images).double().numpy())
    assert det.threshold_.value == max(record["scores"])
    assert record["near_duplicates"]["fraction"] < 0.1  # negative control: distinct digits
    assert not any("near-duplicates" in w for w in record["warnings"])
    config = json.loads((run / "config.json").read_text())
    assert (config["calib_folds"], config["n_train"], config["n_calibration"]) == (0, 54, 6)


def test_cross_fitting_scores_every_training_image_out_of_fold(digit_folders, tmp_path):
    import anomalab
    from anomalab.data.specs import load_spec

    distinct, _, _ = digit_folders
    run = tmp_path / "cross"
    text = fit(distinct, run)  # automatic: knn on 60 images
    record = calibration(run)
    train = load_spec(str(distinct))[0]
    assert record["basis"] == "crossfit" and record["folds"]["k"] == 5
    assert len(record["scores"]) == len(train) == 60 and record["names"] == train.names
    assert "60 normal scores" in text and "5-fold cross-fitting" in text
    det = anomalab.load(run)
    assert det.threshold_.n_normal == 60 and det.threshold_.basis == "crossfit"
    assert det.train_features_.shape[0] == 60  # the saved detector was fitted on every image
    fold = np.asarray(record["fold"])
    for f in range(5):  # each fold's scores come from a detector that never saw the fold
        held = np.flatnonzero(fold == f)
        fold_det = anomalab.create("knn", k=1).fit(train.subset(np.flatnonzero(fold != f)))
        np.testing.assert_allclose(np.asarray(record["scores"])[held], fold_det.score(train.images[held]).numpy(),
                                   rtol=1e-6)
    assert record["near_duplicates"]["fraction"] < 0.1 and not any("near-dup" in w for w in record["warnings"])
    config = json.loads((run / "config.json").read_text())
    assert (config["calib_folds"], config["calib_frac"], config["n_train"]) == (5, 0.0, 60)
    assert "calibration.json" in json.loads((run / "run.json").read_text())["files"]


def test_near_duplicates_are_detected_and_cross_fitting_keeps_them_in_one_fold(digit_folders, tmp_path):
    _, twins, _ = digit_folders
    hold, cross = tmp_path / "hold", tmp_path / "cross"
    text = fit(twins, hold, "--calib-folds", "0")
    record = calibration(hold)
    assert record["near_duplicates"]["fraction"] >= 0.5
    assert any("near-duplicates of training images" in w for w in record["warnings"])
    assert "near-duplicates of training images" in text
    text = fit(twins, cross, "--calib-folds", "5")
    crossed = calibration(cross)
    assert len(crossed["scores"]) == 60
    assert crossed["folds"]["grouped"] and crossed["folds"]["n_grouped_images"] == 60
    fold = dict(zip(crossed["names"], crossed["fold"], strict=True))
    assert all(fold[n] == fold[n.replace("a.png", "b.png")] for n in fold if n.endswith("a.png"))
    assert crossed["near_duplicates"]["n_near_duplicates"] == 0
    assert not any("near-duplicates" in w for w in crossed["warnings"])
    # the twins held out with their pair in training score ~0: the hold-out threshold is far too low
    assert crossed["threshold"]["value"] > record["threshold"]["value"]
    assert record["threshold"]["value"] < 0.25 * crossed["threshold"]["value"]


def test_an_explicit_calib_frac_holds_out_and_cannot_be_mixed_with_folds(digit_folders, tmp_path):
    distinct, _, _ = digit_folders
    fit(distinct, tmp_path / "r", "--calib-frac", "0.2")
    assert calibration(tmp_path / "r")["basis"] == "holdout" and len(calibration(tmp_path / "r")["scores"]) == 12
    code, text = cli("fit", "knn", "--data", distinct, "--out", tmp_path / "s", "--calib-frac", "0.2",
                     "--calib-folds", "5")
    assert code == 2 and "--calib-folds" in text and not (tmp_path / "s").exists()
    code, text = cli("fit", "knn", "--data", distinct, "--out", tmp_path / "s", "--calib-folds", "1")
    assert code == 2 and "--calib-folds" in text and not (tmp_path / "s").exists()


def test_automatic_cross_fitting_falls_back_to_the_hold_out_where_a_fold_is_too_small(mvtec_tree, tmp_path):
    code, text = cli("fit", "knn", "k=20", "--data", mvtec_tree, "--out", tmp_path / "auto", "--no-figures")
    assert code == 0, text
    assert "note: automatic cross-fitting was not possible" in text and "k must be in [1, 19]" in text
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert (config["calib_folds"], config["calib_frac"], config["n_train"]) == (0, 0.1, 22)
    assert calibration(tmp_path / "auto")["basis"] == "holdout"
    code, text = cli("fit", "knn", "k=20", "--data", mvtec_tree, "--out", tmp_path / "asked", "--calib-folds", "5")
    assert code == 2 and "fold 1/5 trains on 19 images" in text and not (tmp_path / "asked").exists()


# ---- anomalab threshold -------------------------------------------------------------------------------
def test_threshold_max_fpr_changes_only_the_threshold(tree_run, mvtec_tree, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tree_run, run)
    before, meta_before = digest(run), json.loads((run / "detector" / "detector.json").read_text())
    ev_before = json.loads((run / "evaluation.json").read_text())
    test_images = (mvtec_tree / "test" / "good", mvtec_tree / "test" / "scratch")
    scored_before = scores_of(cli("score", run, *test_images)[1])
    code, text = cli("threshold", run, "--max-fpr", "0.2")
    assert code == 0, text
    after = digest(run)
    assert {k for k in before if before[k] != after.get(k)} <= THRESHOLD_RECORDS and set(after) == set(before)
    assert all(before[k] == after[k] for k in PLAIN)
    meta = json.loads((run / "detector" / "detector.json").read_text())
    assert {k: v for k, v in meta.items() if k != "threshold"} == {k: v for k, v in meta_before.items()
                                                                   if k != "threshold"}
    record = calibration(run)
    kept = np.asarray(record["scores"])
    new = Threshold.from_dict(meta["threshold"])
    assert new.value == float(np.quantile(kept, 0.8, method="higher")) and new.max_fpr == 0.2
    assert new.n_normal == len(kept) == 24 and new.basis == "crossfit" and new.created
    assert record["threshold"] == meta["threshold"] and record["history"][-1]["threshold"] == meta_before["threshold"]
    assert f"{new.value:.5g}" in text and "24 normal scores" in text
    scored = scores_of(cli("score", run, *test_images)[1])
    assert [r["score"] for r in scored] == [r["score"] for r in scored_before]  # the scores did not move
    assert [r["verdict"] for r in scored] == ["anomalous" if float(r["score"]) > new.value else "normal"
                                              for r in scored]
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["scores"] == ev_before["scores"] and ev["metrics"]["image_auroc"] == ev_before["metrics"]["image_auroc"]
    assert ev["extra"]["threshold"]["value"] == new.value
    labels, s = np.asarray(ev["labels"]), np.asarray(ev["scores"])
    assert ev["metrics"]["fpr_at_threshold"] == float(np.mean(s[labels == 0] > new.value))


def test_threshold_value_sets_it_by_hand_and_verdicts_follow(tree_run, mvtec_tree, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tree_run, run)
    folder = mvtec_tree / "test" / "scratch"
    scores = sorted(float(r["score"]) for r in scores_of(cli("score", run, folder)[1]))
    cut = (scores[2] + scores[3]) / 2
    code, text = cli("threshold", run, "--value", cut, "--pixel-value", "0.5")
    assert code == 0, text
    thr = Threshold.from_dict(json.loads((run / "detector" / "detector.json").read_text())["threshold"])
    assert (thr.value, thr.method, thr.pixel_value) == (cut, "value", 0.5)
    kept = np.asarray(calibration(run)["scores"])
    assert thr.n_normal == 24 and thr.max_fpr == float(np.mean(kept > cut))
    verdicts = [r["verdict"] for r in scores_of(cli("score", run, folder)[1])]
    assert sorted(verdicts) == ["anomalous"] * 3 + ["normal"] * 3
    assert calibration(run)["pixel"]["method"] == "value"


def test_threshold_normal_scores_other_normal_images(digit_folders, tmp_path):
    distinct, _, others = digit_folders
    run = tmp_path / "run"
    fit(distinct, run)
    scores = [float(r["score"]) for r in scores_of(cli("score", run, others)[1])]
    code, text = cli("threshold", run, "--normal", others, "--max-fpr", "0.2")
    assert code == 0, text
    thr = Threshold.from_dict(json.loads((run / "detector" / "detector.json").read_text())["threshold"])
    assert thr.value == float(np.quantile(scores, 0.8, method="higher"))
    assert (thr.n_normal, thr.basis, thr.max_fpr) == (20, "normal", 0.2)
    record = calibration(run)
    assert record["scores"] == scores and record["near_duplicates"]["checked"]
    assert record["near_duplicates"]["n_near_duplicates"] == 0  # other digits: no copies of training images
    assert len(record["history"][-1]["replaced_scores"]["scores"]) == 60  # the fit's scores are kept
    assert "warning" not in text or "near-duplicates" not in text
    # the training images given as "normal": near-duplicates of themselves, so the warning fires
    code, text = cli("threshold", run, "--normal", distinct)
    assert code == 0 and "near-duplicates of training images" in text
    assert calibration(run)["near_duplicates"]["fraction"] == 1.0


def test_threshold_on_an_old_run_and_its_refusals(tree_run, tmp_path):
    from anomalab.runs.atomic import TargetLock

    run = tmp_path / "old"
    shutil.copytree(tree_run, run)
    (run / "calibration.json").unlink()
    marker = json.loads((run / "run.json").read_text())
    marker["files"].remove("calibration.json")
    (run / "run.json").write_text(json.dumps(marker))
    code, text = cli("threshold", run, "--max-fpr", "0.1")
    assert code == 2 and "keeps no normal scores" in text and "--normal" in text
    for args, message in ((["--value", "1", "--max-fpr", "0.1"], "--value"), ([], "--max-fpr"),
                          (["--max-fpr", "1.5"], "--max-fpr"), (["--value", "nan"], "finite")):
        code, text = cli("threshold", run, *args)
        assert code == 2 and message in text, (args, text)
    with TargetLock(run):
        code, text = cli("threshold", run, "--value", "1.0")
    assert code == 2 and "being written by another process" in text
    code, text = cli("threshold", run, "--value", "1.0")
    assert code == 0, text
    assert "calibration.json" in json.loads((run / "run.json").read_text())["files"]
    thr = Threshold.from_dict(json.loads((run / "detector" / "detector.json").read_text())["threshold"])
    assert (thr.value, thr.n_normal, thr.basis) == (1.0, 0, "none")
    code, text = cli("threshold", tmp_path, "--value", "1.0")
    assert code == 2 and "not a complete anomalab run folder" in text


# ---- PaDiM: leave-one-out in closed form ---------------------------------------------------------------
def small_padim():
    import anomalab

    return anomalab.create("padim", image_size=64, d_channels=20, weights=None)


def test_padim_leave_group_out_scores_equal_explicit_refits_without_the_group():
    import torch

    torch.manual_seed(0)
    x = torch.rand(14, 1, 40, 40) * 0.3 + torch.linspace(0, 0.5, 40)[None, None, None, :]
    full = small_padim().fit(x)
    groups = np.arange(14)
    groups[[3, 4]], groups[[7, 8, 9]] = 100, 200  # a pair and a triple left out together
    scores, maps = full.heldout_maps(x, groups)
    assert maps.shape == (14, 40, 40)
    for i in (0, 3, 8, 13):
        ref = small_padim().fit(x[np.flatnonzero(groups != groups[i])])  # refitted without i's group
        np.testing.assert_allclose(float(scores[i]), float(ref.score(x[i : i + 1])[0]), rtol=1e-5)
        np.testing.assert_allclose(maps[i].numpy(), ref.score_map(x[i : i + 1])[0].numpy(), rtol=1e-4, atol=1e-7)
    # negative controls: the full model (which saw the image) scores it lower; leaving out only the image
    # itself, not its group, gives another score than the group-out refit
    assert float(full.score(x[:1])[0]) < float(scores[0])
    alone, _ = full.heldout_maps(x)
    assert abs(float(alone[3]) - float(scores[3])) > 1e-4 * float(scores[3])


def test_padim_leave_one_out_refuses_images_it_was_not_fitted_on():
    import torch

    from anomalab.errors import ParameterError

    x = torch.rand(10, 1, 40, 40)
    det = small_padim().fit(x)
    with pytest.raises(ParameterError, match="fitted on 10 images"):
        det.heldout_maps(x[:9])
    with pytest.raises(ParameterError, match="not the images the model was fitted on"):
        det.heldout_maps(torch.rand(10, 1, 40, 40))
    with pytest.raises(ParameterError, match="fewer than 2"):
        det.heldout_maps(x, np.r_[np.zeros(9, int), 1])


def test_padim_runs_calibrate_by_leave_one_out_unless_folds_are_given(mvtec_tree, tmp_path):
    import anomalab
    from anomalab.data.specs import load_spec

    auto, five = tmp_path / "auto", tmp_path / "five"
    for out, extra in ((auto, ()), (five, ("--calib-folds", "5"))):
        code, text = cli("fit", "padim", "image_size=64", "d_channels=20", "--data", mvtec_tree,
                         "--out", out, "--no-figures", *extra)
        assert code == 0, text
    record, kfold = calibration(auto), calibration(five)
    assert record["folds"]["method"] == "leave-one-out" and len(record["scores"]) == 24
    assert record["folds"]["k"] == len(set(record["fold"])) > 5  # one fold per near-duplicate group
    assert "leave-one-out, closed form" in record["how"]
    assert kfold["folds"]["k"] == 5 and "method" not in kfold["folds"] and "5-fold" in kfold["how"]
    train = load_spec(str(mvtec_tree))[0]
    det = anomalab.load(auto)
    expected, _ = det.heldout_maps(train.images, np.asarray(record["fold"]))
    np.testing.assert_allclose(record["scores"], expected.numpy(), rtol=1e-5)
    assert det.threshold_.value == pytest.approx(float(np.quantile(record["scores"], 0.99, method="higher")))
