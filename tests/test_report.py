"""The report's numbers and pictures: counts at the threshold, per-defect AUROC, which examples are shown
under which heading, the log-axis rule, titles that do not overlap, and the page of a run without a test set."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import cli
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import roc_auc_score

from anomalab.evaluation import evaluate
from anomalab.report import plots
from anomalab.report.verdicts import is_skewed, select_examples
from anomalab.types import ImageSet, Threshold

THR = 1.0


class Fixed:
    """A fitted 'detector' whose scores are given: image i (pixel [0, 0, 0] = i / 1000) scores scores[i];
    its map is the image's first channel scaled by the score."""

    name = "fixed"

    def __init__(self, scores, threshold=THR, max_fpr=0.1):
        self.scores = torch.as_tensor(scores, dtype=torch.float64)
        self.threshold_ = Threshold(value=float(threshold), max_fpr=max_fpr, n_normal=20)

    def _index(self, images):
        return (images[:, 0, 0, 0] * 1000).round().long()

    def score(self, images):
        return self.scores[self._index(images)]

    def score_map(self, images):
        return images[:, 0] * self.scores[self._index(images)].float()[:, None, None]

    def get_params(self):
        return {}


def image_set(labels, classes=None, class_names=None, size=8, masks=True):
    n = len(labels)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, size, size, generator=g) * 0.5
    images[:, 0, 0, 0] = torch.arange(n) / 1000
    m = None
    if masks:
        m = torch.zeros(n, size, size)
        m[torch.as_tensor(labels) == 1, 2:5, 3:6] = 1
    meta = {"name": "stub"} | ({"class_names": class_names} if class_names else {})
    return ImageSet(images=images, labels=torch.as_tensor(labels), masks=m,
                    classes=None if classes is None else torch.as_tensor(classes),
                    names=[f"img{i:02d}.png" for i in range(n)], meta=meta)


@pytest.fixture
def case():
    """40 images: 16 good (class 0), 12 'crack' (1), 12 'stain' (2); scores overlap the threshold, and some
    sit exactly on it (at the threshold = not flagged)."""
    rng = np.random.default_rng(3)
    classes = np.array([0] * 16 + [1] * 12 + [2] * 12)
    labels = (classes > 0).astype(int)
    scores = np.where(labels == 1, rng.normal(1.4, 0.5, 40), rng.normal(0.6, 0.35, 40))
    scores[[2, 20, 33]] = THR
    return scores, labels, classes, ["good", "crack", "stain"]


def test_counts_equal_an_independent_recount(case):
    scores, labels, classes, names = case
    ev = evaluate(Fixed(scores), image_set(labels, classes, names))
    (tn, fp), (fn, tp) = sk_confusion(labels, (scores > THR).astype(int), labels=[0, 1])
    assert ev.extra["counts"] == {"caught": tp, "missed": fn, "false_alarms": fp, "passed": tn}
    assert ev.extra["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert 0 < fn and 0 < fp  # the case really has both kinds of mistakes
    assert ev.metrics["fpr_at_threshold"] == pytest.approx(fp / (fp + tn))
    assert ev.metrics["tpr_at_threshold"] == pytest.approx(tp / (tp + fn))
    record = json.loads(json.dumps(ev.to_dict()))  # and they survive evaluation.json
    assert record["extra"]["counts"] == ev.extra["counts"] and record["extra"]["class_names"] == names


def test_per_defect_auroc_and_recall_match_sklearn_on_the_subset(case):
    scores, labels, classes, names = case
    ev = evaluate(Fixed(scores), image_set(labels, classes, names))
    rows = {r["name"]: r for r in ev.extra["per_class"]}
    assert set(rows) == {"good", "crack", "stain"}
    for cid, name in ((1, "crack"), (2, "stain")):
        keep = (classes == 0) | (classes == cid)
        assert rows[name]["auroc"] == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
        assert rows[name]["recall"] == pytest.approx(np.mean(scores[classes == cid] > THR))
        assert rows[name]["caught"] + rows[name]["missed"] == 12
    assert rows["crack"]["auroc"] != pytest.approx(rows["stain"]["auroc"])  # not the overall AUROC twice
    assert rows["good"]["false_alarms"] == int(np.sum(scores[classes == 0] > THR))
    assert "auroc" not in rows["good"]


def test_evaluate_keeps_the_class_names_of_an_mvtec_folder(mvtec_tree):
    from anomalab.data.folder import load_mvtec

    test = load_mvtec(mvtec_tree, split="test")
    test.images[:, 0, 0, 0] = torch.arange(len(test)) / 1000  # the index Fixed reads its score by
    ev = evaluate(Fixed(np.linspace(0, 2, len(test))), test)
    assert ev.extra["class_names"] == ["good", "scratch"]
    assert [r["name"] for r in ev.extra["per_class"]] == ["good", "scratch"]


def test_examples_missed_are_only_false_negatives_and_alarms_only_false_positives(case):
    scores, labels, *_ = case
    picks = select_examples(scores, labels, THR, n=100)
    fn = {i for i in range(len(scores)) if labels[i] == 1 and scores[i] <= THR}
    fp = {i for i in range(len(scores)) if labels[i] == 0 and scores[i] > THR}
    assert set(picks["missed"]) == fn and set(picks["false_alarms"]) == fp
    assert 20 in picks["missed"] and 2 not in picks["false_alarms"]  # exactly at the threshold: not flagged
    assert [scores[i] for i in picks["missed"]] == sorted(scores[i] for i in fn)  # worst misses first
    assert [scores[i] for i in picks["false_alarms"]] == sorted((scores[i] for i in fp), reverse=True)
    assert len(select_examples(scores, labels, THR, n=2)["missed"]) == 2


def test_a_caught_anomaly_is_never_shown_as_missed():
    """Negative control: every anomaly is caught, so nothing is missed; the lowest-scored anomalies (what
    'hardest cases' used to show under 'missed anomalies') are caught ones."""
    scores = np.array([0.1, 0.3, 0.5, 1.2, 0.9, 1.5, 2.0, 3.0])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    picks = select_examples(scores, labels, THR, n=4)
    lowest_anomalies = [i for i in np.argsort(scores) if labels[i] == 1][:2]
    assert all(scores[i] > THR for i in lowest_anomalies)
    assert picks["missed"] == [] and picks["false_alarms"] == [3]
    assert select_examples(scores, labels, None)["missed"] == []  # no threshold: nothing decided


def test_log_axis_rule_fires_on_skewed_scores_and_not_on_symmetric_ones(monkeypatch):
    rng = np.random.default_rng(0)
    metric_like = np.concatenate([rng.uniform(0.002, 0.01, 95), rng.uniform(0.2, 0.6, 5)])  # normals in one bin
    for skewed in (rng.lognormal(0, 1.5, 500), metric_like, rng.exponential(1.0, 2000) + 1e-3):
        assert is_skewed(skewed)
    for symmetric in (rng.normal(5, 1, 500), rng.uniform(1, 2, 500), np.linspace(1, 3, 50)):
        assert not is_skewed(symmetric)
    assert not is_skewed(rng.normal(0, 1, 500) ** 3)  # skewed, but not positive: no log axis
    assert not is_skewed([1.0, 100.0])  # too few to tell

    scales = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: scales.append(fig.axes[0].get_xscale()))
    labels = (np.arange(100) >= 95).astype(int)
    plots.score_histogram(metric_like, labels, "unused.png", threshold=0.012)
    plots.score_histogram(rng.normal(5, 1, 100), labels, "unused.png", threshold=5.5)
    assert scales == ["log", "linear"]


def _overlaps(fig) -> list[str]:
    """Texts among figure/subfigure titles and axes titles whose drawn boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = []
    for f in [fig, *fig.subfigs]:
        if getattr(f, "_suptitle", None) is not None and f._suptitle.get_text():
            texts.append(f._suptitle)
    texts += [ax.title for ax in fig.get_axes() if ax.title.get_text()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    return [f"{a!r} / {b!r}" for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


def test_figure_titles_do_not_overlap_axes_titles(monkeypatch):
    import matplotlib.pyplot as plt

    bad = plt.figure(figsize=(4, 2))  # negative control: the check sees an overlap when there is one
    bad.add_subplot(1, 1, 1).set_title("axes title")
    bad.subplots_adjust(top=0.85)
    bad.suptitle("figure title", y=0.95)
    assert _overlaps(bad)
    plt.close(bad)

    found = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: found.setdefault(str(path), _overlaps(fig)))
    maps = torch.rand(5, 8, 8)
    plots.image_grid([("input", torch.rand(5, 1, 8, 8)), ("map", maps)], "grid.png", col_titles=list("abcde"),
                     title="a figure title", map_rows=("map",))
    plots.loss_curves([{"loss": 1.0, "kl": 0.1}, {"loss": 0.5, "kl": 0.2}], "loss.png")
    sec = plots.Section("a section heading", images=torch.rand(3, 1, 8, 8), col_titles=["x\ny"] * 3, maps=maps[:3],
                        masks=torch.ones(3, 8, 8))
    plots.example_panel([sec, plots.Section("empty", empty="none missed")], "panel.png",
                        scale=plots.MapScale(0.1, 0.5, 1.0), title="a figure title")
    plots.scores_by_class([0.1, 0.2, 2.0], [0, 0, 1], [0, 0, 1], "by_type.png", ["good", "crack"], 1.0, "per type")
    assert found == {"grid.png": [], "loss.png": [], "panel.png": [], "by_type.png": []}


def _run_figures(tmp_path, monkeypatch, scores, labels, classes, names):
    from anomalab.report import figures

    det = Fixed(scores)
    test = image_set(labels, classes, names)
    ev = evaluate(det, test)
    drawn = {}

    def keep(fig, path):
        drawn[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    figures.evaluation_figures(det, test, ev, tmp_path, n=4)
    return drawn


def test_example_maps_share_one_threshold_anchored_scale(case, tmp_path, monkeypatch):
    drawn = _run_figures(tmp_path, monkeypatch, *case)
    assert {"score_histogram.png", "scores_by_type.png", "roc.png", "most_anomalous.png",
            "hardest_cases.png"} <= set(drawn)
    limits = {(im.norm.vmin, im.norm.vmax) for name in ("most_anomalous.png", "hardest_cases.png")
              for ax in drawn[name].get_axes() for im in ax.get_images() if im.get_cmap().name == "inferno"}
    assert len(limits) == 1  # one scale for every map of both figures, not per-image min-max
    headings = [f._suptitle.get_text() for f in drawn["hardest_cases.png"].subfigs]
    assert headings[0].startswith("missed anomalies") and headings[1].startswith("false alarms")
    titles = [ax.title.get_text() for ax in drawn["hardest_cases.png"].subfigs[0].get_axes()]
    shown = [int(m) for t in titles for m in re.findall(r"img(\d+)\.png", t)]
    scores, labels = case[0], case[1]
    assert shown and all(labels[i] == 1 and scores[i] <= THR for i in shown)  # file names of real misses


def test_no_misses_says_so(tmp_path, monkeypatch):
    scores = np.array([0.1, 0.3, 0.5, 1.2, 1.5, 2.0, 3.0, 2.5])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    drawn = _run_figures(tmp_path, monkeypatch, scores, labels, labels, ["good", "dent"])
    missed = drawn["hardest_cases.png"].subfigs[0]
    assert missed._suptitle.get_text().startswith("missed anomalies: 0 of 4")
    (ax,) = missed.get_axes()  # no images, only the words
    assert [t.get_text() for t in ax.texts] == ["none missed"] and not ax.get_images()


def test_map_scale_is_anchored_at_the_normal_maxima():
    from anomalab.report.figures import map_scale

    reference = torch.zeros(10, 4, 4)
    reference[:, 0, 0] = torch.arange(1, 11).float()  # hottest pixels 1..10
    scale = map_scale(reference, [torch.full((2, 4, 4), 30.0)], max_fpr=0.1)
    assert scale.anchor == 10.0 and scale.vmin == 0.0 and scale.vmax == 30.0
    assert map_scale(reference, [torch.zeros(1, 4, 4)], max_fpr=0.1).vmax == 20.0  # anchor stays mid-scale

    from anomalab.report.figures import _scale  # a run's calibration.json sets it: its pixel threshold and level

    record = {"pixel": {"value": 4.0}, "maps": {"level": 1.0}}
    scale = _scale(Fixed([0.0]), record, None, [torch.full((1, 4, 4), 9.0)])
    assert (scale.vmin, scale.anchor, scale.vmax, scale.anchor_label) == (1.0, 4.0, 9.0, "pixel threshold")


def test_report_of_a_test_set_run_has_counts_per_defect_and_names(mvtec_tree, tmp_path):
    out = tmp_path / "run"
    code, text = cli("fit", "knn", "k=3", "--data", mvtec_tree, "--out", out)
    assert code == 0, text
    ev = json.loads((out / "evaluation.json").read_text())
    html = (out / "report.html").read_text()
    assert "id=counts" in html and "id=per-defect" in html and ".tmp-" not in html
    c = ev["extra"]["counts"]
    assert f"{c['false_alarms']} false alarms" in html and f"{c['caught']} caught" in html
    scores, labels = np.array(ev["scores"]), np.array(ev["labels"])
    for i in range(len(scores)):
        listed = f"<code>{ev['names'][i]}</code>" in html
        assert listed == ((labels[i] == 0 and scores[i] > ev["extra"]["threshold"]["value"])
                          or (labels[i] == 1 and scores[i] <= ev["extra"]["threshold"]["value"]))
    if c["missed"] == 0:
        assert "None missed" in html
    for f in ("scores_by_type.png", "hardest_cases.png", "most_anomalous.png"):
        assert (out / f).is_file()


def test_plain_folder_report_shows_the_calibration(mvtec_tree, tmp_path, monkeypatch):
    out = tmp_path / "plain"
    code, text = cli("fit", "knn", "k=3", "--data", mvtec_tree / "train" / "good", "--out", out)
    assert code == 0, text
    assert not (out / "evaluation.json").exists()
    html = (out / "report.html").read_text()
    assert "id=calibration" in html and "no test set" in html
    for f in ("calibration_scores.png", "calibration_examples.png"):
        assert (out / f).is_file() and f.removesuffix(".png").replace("_", " ") in html

    scores = [0.1, 0.2, 0.25, 0.3, 0.9]  # a hand-written calibration record, in the format fit writes
    (out / "calibration.json").write_text(json.dumps({"scores": scores, "max_fpr": 0.01}))
    code, text = cli("report", out)
    assert code == 0, text
    html = (out / "report.html").read_text()
    assert "id=calibration-scores" in html and "<td>5</td>" in html

    from anomalab.data.folder import load_folder
    from anomalab.report import figures
    from anomalab.runs import RunFolder

    titles = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: titles.append(fig.axes[0].get_title()))
    images = load_folder(mvtec_tree / "train" / "good")
    figures.calibration_figures(RunFolder(out).detector(), images.subset(range(3)), out, train=images)
    assert titles[0].endswith(f"scores of the {len(scores)} held-out normal images")  # read from the record


def test_expected_false_alarm_rate_and_binomial_tail():
    from scipy.stats import binom

    from anomalab.report.verdicts import binomial_tail, expected_false_alarm_rate

    rng = np.random.default_rng(1)
    for n, f in ((2, 0.01), (10, 0.01), (150, 0.01), (40, 0.1)):
        s = rng.normal(size=(4000, n + 1))
        thr = np.array([Threshold.fit(row[:n], f).value for row in s])
        assert np.mean(s[:, n] > thr) == pytest.approx(expected_false_alarm_rate(n, f), abs=0.02)
    for k, n, p in ((0, 10, 0.1), (3, 50, 0.02), (20, 20, 1 / 11), (7, 300, 0.01)):
        assert binomial_tail(k, n, p) == pytest.approx(binom.sf(k - 1, n, p), rel=1e-9)


def test_report_warns_when_test_normals_raise_far_more_alarms_than_the_threshold_allows(tmp_path):
    from anomalab.report.html import write_report

    run = tmp_path / "run"
    run.mkdir()
    labels = [0] * 20 + [1] * 10
    for shifted, expect in ((True, True), (False, False)):
        scores = [2.0 if shifted or i % 10 == 0 else 0.5 for i in range(20)] + [3.0] * 10
        record = {"detector": "x", "dataset": "d", "scores": scores, "labels": labels, "metrics": {},
                  "extra": {"threshold": {"value": 1.0, "max_fpr": 0.01, "n_normal": 200}}}
        (run / "evaluation.json").write_text(json.dumps(record))
        page = write_report([run], tmp_path / "r.html").read_text()
        assert ("normal test images are false alarms" in page) == expect
