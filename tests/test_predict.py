"""`anomalab predict`: one row, overlay and mask per readable image, scored as `anomalab score` scores it,
on a colour scale fixed by the run's pixel threshold; a gallery sorted by score; the output rules."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import cli
from PIL import Image

from anomalab.predict import ColourScale, mask, overlay


@pytest.fixture(scope="module")
def run(knn_run):
    return knn_run


@pytest.fixture(scope="module")
def images(mvtec_tree, tmp_path_factory):
    """A folder with the 12 test images (6 good, 6 scratched, renamed to be unique) and one unreadable file."""
    folder = tmp_path_factory.mktemp("inputs") / "images"
    folder.mkdir()
    for kind in ("good", "scratch"):
        for p in sorted((mvtec_tree / "test" / kind).glob("*.png")):
            shutil.copy(p, folder / f"{kind}_{p.name}")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def predicted(run, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "pred"
    code, text = cli("predict", run, images, "--out", out)
    assert code == 0, text
    return out, text


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def hidden_siblings(path) -> list:
    return sorted(path.parent.glob(f".{path.name}.*"))


def test_one_row_overlay_and_mask_per_readable_image(predicted, images):
    out, text = predicted
    rows = read_csv((out / "predictions.csv").read_text())
    readable = sorted(p for p in images.glob("*.png") if p.name != "broken.png")
    assert [r["path"] for r in rows] == [str(p) for p in readable]
    assert [r["name"] for r in rows] == [p.name for p in readable]
    assert len(list((out / "overlays").iterdir())) == len(list((out / "masks").iterdir())) == 12
    for r in rows:
        assert (out / r["overlay"]).is_file() and (out / r["mask"]).is_file()
        assert pixels(out / r["overlay"]).shape == (16, 16, 3) and pixels(out / r["mask"]).shape == (16, 16)
    assert {r["verdict"] for r in rows if r["name"].startswith("scratch")} == {"anomalous"}
    marker = json.loads((out / "predict.json").read_text())
    assert marker["kind"] == "predict" and marker["n_images"] == 12 and marker["n_skipped"] == 1
    assert "12 images" in text and "1 unreadable skipped" in text


def test_scores_and_verdicts_equal_anomalab_score(predicted, run, images):
    out, _ = predicted
    code, text = cli("score", run, images)
    assert code == 0, text
    scored = {r["name"]: (r["score"], r["verdict"]) for r in read_csv(text)}
    rows = read_csv((out / "predictions.csv").read_text())
    assert {r["path"]: (r["score"], r["verdict"]) for r in rows} == scored
    threshold = json.loads((run / "detector" / "detector.json").read_text())["threshold"]["value"]
    assert {float(r["threshold"]) for r in rows} == {threshold}


def test_mask_is_the_map_above_the_pixel_threshold_recomputed_here(predicted, run):
    import anomalab

    out, _ = predicted
    det = anomalab.load(run)
    assert det.threshold_.pixel_value is not None
    rows = read_csv((out / "predictions.csv").read_text())
    n_marked = 0
    for r in rows:
        gray = torch.from_numpy(np.asarray(Image.open(r["path"]), dtype=np.float32) / 255)[None, None]
        amap = det.score_map(gray)[0].numpy()
        expected = amap > det.threshold_.pixel_value
        got = pixels(out / r["mask"])
        assert set(np.unique(got)) <= {0, 255}
        np.testing.assert_array_equal(got == 255, expected)
        n_marked += int(expected.sum())
        if r["name"].startswith("scratch"):
            assert expected[3:13, 7:9].mean() > 0.5  # the scratch is marked
    assert n_marked > 0


def test_overlays_use_the_run_scale_and_stay_cool_below_the_threshold(predicted, run):
    out, _ = predicted
    scale = ColourScale(**json.loads((out / "predict.json").read_text())["colour_scale"])
    import anomalab

    det = anomalab.load(run)
    assert scale.threshold == det.threshold_.pixel_value
    for r in read_csv((out / "predictions.csv").read_text()):
        image = np.asarray(Image.open(r["path"]), dtype=np.float32)[None] / 255
        amap = det.score_map(torch.from_numpy(image)[None])[0].numpy()
        got = pixels(out / r["overlay"]).astype(int)
        np.testing.assert_array_equal(got, overlay(image, amap, scale))
        warm = got[..., 0] > got[..., 2]  # gray images: red over blue only where the colour is warm
        np.testing.assert_array_equal(warm, amap > scale.threshold)


def test_the_same_map_value_gives_the_same_colour_in_any_image():
    scale = ColourScale.for_run(1.0, level=0.2)
    base = np.full((1, 4, 4), 0.5)
    quiet, loud = np.full((4, 4), 0.1), np.full((4, 4), 0.1)
    loud[1:, 1:] = 50.0  # a per-image min-max scale would change every colour of this image
    for value in (0.6, 0.99, 1.3, 3.0):
        quiet[0, 0] = loud[0, 0] = value
        np.testing.assert_array_equal(overlay(base, quiet, scale)[0, 0], overlay(base, loud, scale)[0, 0])
    below = overlay(base, np.full((4, 4), 0.999), scale)[0, 0].astype(int)
    above = overlay(base, np.full((4, 4), 1.001), scale)[0, 0].astype(int)
    assert below[0] <= below[2] and above[0] > above[2] + 60
    np.testing.assert_array_equal(overlay(base, np.full((4, 4), 0.2), scale)[0, 0], [128, 128, 128])  # clear
    np.testing.assert_array_equal(mask(np.array([[0.999, 1.0, 1.001]]), 1.0), [[0, 0, 255]])
    # negative control: min-max scaling of the quiet image alone would paint its (normal) pixel red
    minmax = ColourScale(low=0.1, threshold=0.1 + 0.5 * (0.6 - 0.1), high=0.6)
    quiet[0, 0] = 0.6
    red = overlay(base, quiet, minmax)[0, 0].astype(int)
    assert red[0] > red[2]


def test_gallery_lists_every_image_sorted_by_score(predicted):
    out, _ = predicted
    page = (out / "index.html").read_text()
    cards = re.findall(r"<figure class='card (\w+)' data-name='([^']*)' data-score='([^']*)'", page)
    rows = read_csv((out / "predictions.csv").read_text())
    assert sorted(c[1] for c in cards) == sorted(r["path"] for r in rows)
    scores = [float(c[2]) for c in cards]
    assert scores == sorted(scores, reverse=True)
    assert {c[1]: c[0] for c in cards} == {r["path"]: r["verdict"] for r in rows}
    for r in rows:
        assert r["name"] in page and f"{float(r['score']):.5g}" in page
    assert "data:image/png;base64," in page  # the colour bar, inline
    assert "dataset.show" in page and "value=anomalous" in page  # the verdict filter
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # nothing from outside the folder


def test_predict_refuses_existing_input_and_foreign_folders(run, images, predicted, tmp_path):
    out, _ = predicted
    before = (out / "predictions.csv").read_bytes()
    code, text = cli("predict", run, images, "--out", out)
    assert code == 2 and "--overwrite" in text and (out / "predictions.csv").read_bytes() == before
    code, text = cli("predict", run, images, "--out", images / "pred")
    assert code == 2 and "input" in text and not (images / "pred").exists()
    code, text = cli("predict", run, images, "--out", run / "pred")
    assert code == 2 and "input" in text and not (run / "pred").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, text = cli("predict", run, images, "--out", foreign, "--overwrite")
    assert code == 2 and "not an anomalab predict folder" in text
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    again = tmp_path / "again"
    shutil.copytree(out, again)
    code, text = cli("predict", run, images, "--out", again, "--overwrite", "--format", "jpg")
    assert code == 0, text
    assert len(list((again / "overlays").glob("*.jpg"))) == 12 and not list((again / "overlays").glob("*.png"))


def test_an_interrupted_predict_leaves_nothing(run, images, predicted, tmp_path, monkeypatch):
    import anomalab.predict as predict_module

    real, calls = predict_module._save, []

    def save_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "_save", save_then_stop)
    new = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict(run, [images], new, progress=False)
    assert not new.exists() and hidden_siblings(new) == []
    old = tmp_path / "old"
    shutil.copytree(predicted[0], old)
    before = {p.name: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict(run, [images], old, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert hidden_siblings(old) == []


def test_shards_do_not_collide_and_join_to_the_whole(run, images, predicted, tmp_path):
    parts = []
    for k in (0, 1):
        code, text = cli("predict", run, images, "--out", tmp_path / f"s{k}", "--shard", f"{k}/2")
        assert code == 0, text
        parts.append(read_csv((tmp_path / f"s{k}" / "predictions.csv").read_text()))
    whole = read_csv((predicted[0] / "predictions.csv").read_text())
    assert sorted(r["path"] for p in parts for r in p) == sorted(r["path"] for r in whole)
    overlays = [r["overlay"] for p in parts for r in p]
    assert len(set(overlays)) == len(overlays) == 12
    assert sorted(overlays) == sorted(r["overlay"] for r in whole)


def test_a_detector_without_maps_gets_the_csv_and_gallery(run, images, tmp_path, monkeypatch):
    from anomalab.detectors.knn import KNN

    def no_maps(self, x):
        raise NotImplementedError("no maps here")

    monkeypatch.setattr(KNN, "_map_batch", no_maps)
    out = tmp_path / "p"
    code, text = cli("predict", run, images, "--out", out)
    assert code == 0, text
    assert text.count("gives no anomaly maps") == 1
    rows = read_csv((out / "predictions.csv").read_text())
    assert len(rows) == 12 and all(r["overlay"] == r["mask"] == "" for r in rows)
    assert not (out / "overlays").exists() and (out / "index.html").is_file()
