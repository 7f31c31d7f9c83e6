"""The experiments layer: cells go into a ResultStore and a rerun skips them; `--set` values are checked
before anything trains; rows written by earlier versions still load under the same keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from anomalab.errors import ParameterError, UnknownNameError
from anomalab.experiments import baselines_mnist, continual_mnist, gan_mnist
from anomalab.experiments._common import detector_sets, markdown_table, mean_std, open_store


def test_baselines_resume_skips_finished_cells(tmp_path, monkeypatch):
    argv = ["--out", str(tmp_path), "--digits", "1", "--seeds", "0"]
    first = baselines_mnist.main(argv)["results"]
    assert sorted(r["detector"] for r in first) == ["knn", "pca"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["digit"] == 1
    monkeypatch.setattr(baselines_mnist, "run_cell", lambda *a: pytest.fail("a finished cell ran again"))
    again = baselines_mnist.main(argv)["results"]
    assert again == first and len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    assert "| knn | 0." in (tmp_path / "results.md").read_text()


def test_baselines_run_only_the_missing_cells(tmp_path, monkeypatch):
    # a row as the whole-file writer of earlier versions wrote it: same fields, same key
    (tmp_path / "results.jsonl").write_text(json.dumps({"detector": "knn", "digit": 1, "seed": 0,
                                                        "image_auroc": 0.5}) + "\n")
    ran = []
    monkeypatch.setattr(baselines_mnist, "run_cell", lambda name, *a: ran.append(name) or {"image_auroc": 0.75})
    rows = baselines_mnist.main(["--out", str(tmp_path), "--digits", "1", "--seeds", "0"])["results"]
    assert ran == ["pca"]
    assert {r["detector"]: r["image_auroc"] for r in rows} == {"knn": 0.5, "pca": 0.75}


TINY = ["--detectors", "ganomaly", "--digits", "0", "--seeds", "0", "--epochs", "1", "--no-baselines",
        "--set", "ganomaly.train_limit=64", "--set", "ganomaly.test_limit=40",
        "--set", "ganomaly.latent_dim=8", "--set", "ganomaly.width=8"]


def test_gan_mnist_resume_skips_finished_cells(tmp_path, monkeypatch):
    gan_mnist.main(["--out", str(tmp_path), *TINY])
    (row,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert (row["detector"], row["digit"], row["seed"]) == ("ganomaly", 0, 0)
    assert row["budget"] == "epochs=1 bn_recalibrate=True latent_dim=8 test_limit=40 train_limit=64 width=8"
    assert row["n_train"] == 64 and row["n_test"] == 40 and row["steps"]
    assert (tmp_path / "results.md").is_file() and (tmp_path / "auroc_bars.png").is_file()
    monkeypatch.setattr(gan_mnist, "run_cell", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert gan_mnist.main(["--out", str(tmp_path), *TINY])["rows"] == 1


class Cut(Exception):
    """Stands in for the process being killed."""


def test_gan_mnist_cell_cut_in_training_or_scoring_resumes_to_the_uncut_result(tmp_path, monkeypatch):
    import anomalab.runs.atomic as atomic
    from anomalab.detectors.ganomaly import GANomaly
    from anomalab.train.epochs import Checkpoint

    argv = [*TINY, "--epochs", "3", "--set", "ganomaly.batch_size=32"]  # 2 steps per epoch
    monkeypatch.setattr(GANomaly, "score_batch_size", 8)  # 40 test digits: 5 batches,
    monkeypatch.setattr(gan_mnist, "SCORE_CHUNK", 1)  # each saved as it is scored
    monkeypatch.setattr(gan_mnist, "CHECKPOINT_EVERY_S", 0)  # training state at every epoch end
    gan_mnist.main(["--out", str(tmp_path / "uncut"), *argv])
    uncut = json.loads((tmp_path / "uncut" / "results.jsonl").read_text())
    assert "resumed" not in uncut and not (tmp_path / "uncut" / "checkpoints").exists()

    out = tmp_path / "cut"
    write, writes = Checkpoint.write, []

    def write_then_die(self, state):  # killed right after the second epoch's checkpoint
        write(self, state)
        writes.append(1)
        if len(writes) == 2:
            raise Cut

    monkeypatch.setattr(Checkpoint, "write", write_then_die)
    with pytest.raises(Cut):
        gan_mnist.main(["--out", str(out), *argv])
    (folder,) = (out / "checkpoints").iterdir()
    assert (folder / "train.pt").is_file() and not (out / "results.jsonl").exists()
    monkeypatch.setattr(Checkpoint, "write", write)

    save, saves = atomic.write_file_atomic, []

    def save_then_die(target, data):  # killed after the second chunk of test scores
        save(target, data)
        saves.append(target)
        if len(saves) == 2:
            raise Cut

    monkeypatch.setattr(atomic, "write_file_atomic", save_then_die)
    with pytest.raises(Cut):
        gan_mnist.main(["--out", str(out), *argv])
    assert (folder / "detector" / "detector.json").is_file() and not (folder / "train.pt").exists()
    assert len(np.load(folder / "scores.npz")["scores"]) == 16
    monkeypatch.setattr(atomic, "write_file_atomic", save)

    gan_mnist.main(["--out", str(out), *argv])
    row = json.loads((out / "results.jsonl").read_text())
    assert row["resumed"] == "scoring"
    for key in ("image_auroc", "aupr", "history", "n_train", "n_test"):
        assert row[key] == uncut[key], key
    assert not (out / "checkpoints").exists()  # removed once the row is stored
    assert uncut["fit_s"] > 0 and row["fit_s"] > 0 and row["score_s"] > 0


def test_a_finished_cells_folder_loses_only_what_the_cell_wrote(tmp_path):
    folder = gan_mnist.cell_folder(tmp_path, "egbad", 3, 0, "epochs=paper bn_recalibrate=True")
    (folder / "detector").mkdir(parents=True)
    for name in ("train.pt", "fit.json", "scores.npz", ".train.pt.tmp-123-ab", "detector/detector.json",
                 "detector/weights.safetensors"):
        (folder / name).write_text("x")
    (folder / "notes.txt").write_text("mine")  # a user's file: kept, and so is its folder
    gan_mnist.remove_cell_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (folder / "notes.txt").unlink()
    (folder / "train.pt").write_text("x")
    gan_mnist.remove_cell_folder(folder)
    assert not (tmp_path / "checkpoints").exists()
    other = tmp_path / "checkpoints" / "x" / "detector"  # a detector/ that is not a saved detector stays
    other.mkdir(parents=True)
    (other / "a.png").write_text("x")
    gan_mnist.remove_cell_folder(other.parent)
    assert (other / "a.png").is_file()


def test_gan_bn_defaults_scores_each_milestone_under_each_treatment_and_resumes(tmp_path, monkeypatch):
    from anomalab.experiments import gan_bn_defaults as bn

    monkeypatch.setattr(bn, "ANOGAN", {"n_steps": 2, "test_limit": 40})
    args = ["--out", str(tmp_path), "--digits", "0", "--milestones", "1", "2", "--train-limit", "64"]
    bn.main([*args, "--detectors", "ganomaly", "anogan"])
    rows = {r["detector"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert [p["epochs"] for p in rows["ganomaly"]["points"]] == [1, 2]
    assert set(rows["ganomaly"]["points"][0]["auroc"]) == {"running averages", "re-estimated", "test batches"}
    assert set(rows["anogan"]["points"][1]["auroc"]) == {"running averages", "re-estimated"}  # GANomaly only
    assert rows["anogan"]["n_test"] == 40 and rows["ganomaly"]["n_train"] == 64
    fit = [p["fit_s"] for p in rows["ganomaly"]["points"]]
    assert 0 < fit[0] < fit[1]
    text = (tmp_path / "results.md").read_text()
    assert "re-estimated (default)" in text and "test batches (uses test labels)" in text
    assert (tmp_path / "bn_defaults.png").stat().st_size > 10_000
    monkeypatch.setattr(bn, "run_cell", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert bn.main([*args, "--detectors", "ganomaly"])["rows"] == 2
    with pytest.raises(SystemExit):
        bn.main([*args[:4], "--milestones", "5", "1"])  # not increasing


@pytest.mark.parametrize("item, message", [
    ("ganomaly.epochs=ten", "ganomaly: epochs must be an integer, got 'ten'"),
    ("ganomaly.epochs=0", "ganomaly: epochs must be a positive integer"),
    ("ganomaly.train_limit=many", "ganomaly: train_limit must be an integer or null, got 'many'"),
    ("ganomaly.nope=1", "ganomaly has no parameter 'nope'"),
    ("ganomaly=1", "expected DET.PARAM=VALUE"),
])
def test_a_bad_set_fails_with_one_parameter_error_before_training(tmp_path, monkeypatch, item, message):
    monkeypatch.setattr(gan_mnist, "load_mnist", lambda *a: pytest.fail("data loaded despite a bad --set"))
    monkeypatch.setattr(gan_mnist, "run_cell", lambda *a, **k: pytest.fail("trained despite a bad --set"))
    with pytest.raises(ParameterError, match=message) as err:
        gan_mnist.main(["--out", str(tmp_path / "out"), "--detectors", "ganomaly", "--set", item])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_a_set_for_an_unknown_detector_is_refused():
    with pytest.raises(UnknownNameError, match="unknown detector 'ganomly'"):
        detector_sets(["ganomly.epochs=1"], gan_mnist.DETECTORS)


def test_budget_tags_match_the_rows_of_earlier_runs():
    """Values are converted by their parameter's type, so the budget tag (a part of the key) is spelled as
    the earlier parser spelled it and a rerun of the same command skips the same cells."""
    sets = detector_sets(["ganomaly.bn_recalibrate=true", "anogan.n_steps=50", "anogan.latent_lr=0.05",
                          "anogan.test_limit=100", "knn.k=3"], (*gan_mnist.DETECTORS, *gan_mnist.BASELINES),
                         extra=gan_mnist.CellLimits)
    assert gan_mnist.plan("ganomaly", None, sets["ganomaly"]) == (
        {"bn_recalibrate": True}, {}, "epochs=paper bn_recalibrate=True")
    params, limits, budget = gan_mnist.plan("anogan", 15, sets["anogan"])
    assert params == {"n_steps": 50, "latent_lr": 0.05, "epochs": 15} and limits == {"test_limit": 100}
    assert budget == "epochs=15 bn_recalibrate=True latent_lr=0.05 n_steps=50 test_limit=100"
    assert gan_mnist.plan("egbad", None, {})[2] == "epochs=paper bn_recalibrate=True"  # default named
    assert gan_mnist.plan("egbad", None, {"bn_recalibrate": False})[2] == "epochs=paper bn_recalibrate=False"
    assert gan_mnist.plan("knn", None, sets["knn"])[2] == "k=3"
    assert gan_mnist.plan("pca", None, {})[2] == "default"


def test_batch_statistics_score_like_training_mode_and_keep_the_running_averages():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 1),
                        nn.BatchNorm1d(1))
    net.train()
    for _ in range(3):
        net(torch.randn(16, 1, 8, 8))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(10, 1, 8, 8)
    net.eval()
    with torch.no_grad(), gan_mnist.batch_statistics(net):
        inside = net(x)
    after = net.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    net.train()
    with torch.no_grad():
        expected = net(x)
    assert torch.allclose(inside, expected)


def test_continual_cells_are_keyed_by_their_settings(tmp_path):
    args = continual_mnist.parse_args(["--out", str(tmp_path), "--strategies", "ewc"])
    store = open_store(tmp_path, continual_mnist.KEY)
    store.add({"strategy": "ewc", "seed": 0, "settings": continual_mnist.settings_key(args, "ewc"), "auroc": [0.5]})
    again = open_store(tmp_path, continual_mnist.KEY)  # read back from the JSON lines
    key = {"strategy": "ewc", "seed": 0, "settings": continual_mnist.settings_key(args, "ewc")}
    assert again.get(key)["auroc"] == [0.5]
    other = continual_mnist.parse_args(["--out", str(tmp_path), "--strategies", "ewc", "--ewc-lambda", "1000"])
    assert again.get({**key, "settings": continual_mnist.settings_key(other, "ewc")}) is None


def test_formatting_helpers():
    assert mean_std([0.9, 0.8]) == "0.850 ± 0.050"
    assert mean_std([0.9], count=True) == "0.900 (1)" and mean_std([]) == "-"
    assert mean_std(np.array([0.91, 0.93]), count=True) == "0.920 ± 0.010 (2)"
    assert markdown_table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]


def test_gan_mnist_lists_the_paper_plan_cells_not_run_with_their_measured_cost():
    def row(name, digit, seed, cost, budget="epochs=paper bn_recalibrate=True"):
        return {"detector": name, "digit": digit, "seed": seed, "budget": budget, "fit_s": cost, "score_s": 0.0}

    rows = [row("ganomaly", d, s, 240.0) for d in range(10) for s in (0, 1)]  # seed 2 missing
    rows += [row("skip_ganomaly", d, s, 420.0) for d in range(10) for s in (0, 1, 2)]  # complete
    rows += [row("egbad", 0, 0, 3000.0, "epochs=paper bn_recalibrate=False")]  # an older tag counts as run
    text = "\n".join(gan_mnist.not_run_lines(rows))
    assert "| ganomaly | 10 | seed 2: digits 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 | not run yet: one cell took 4 min" in text
    assert "| egbad | 9 | seed 0: digits 1, 2, 3, 4, 5, 6, 7, 8, 9 | not run yet: one cell took 50 min" in text
    assert "| anogan | 10 |" in text and "no cell of it measured" in text
    assert "skip_ganomaly" not in text
    # the median cost: one cell run on a crowded machine (3x slower) does not move it
    slow = [*rows, row("egbad", 1, 0, 1500.0), row("egbad", 2, 0, 1560.0)]
    assert "| egbad | 7 | seed 0: digits 3, 4, 5, 6, 7, 8, 9 | not run yet: one cell took 26 min on one core here " \
           "(median of 3)" in "\n".join(gan_mnist.not_run_lines(slow))
    # a reduced-budget table has no paper plan to report against
    assert gan_mnist.not_run_lines([row("ganomaly", 0, 0, 10.0, "epochs=1")]) == []
