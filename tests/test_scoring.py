"""Scoring files: a file's score depends on the file alone (not on shards, order or the other files)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import anomalab as al
from anomalab.data.folder import read_image
from anomalab.data.transforms import prepare
from anomalab.errors import DataError, DataNotFoundError, ParameterError
from anomalab.scoring import collect_files, iter_scores, parse_shard, shard

SIZES = [(12, 12), (8, 8), (20, 16), (30, 30), (12, 12), (5, 9), (12, 12), (40, 24), (16, 20), (12, 12), (9, 5)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        shape = (h, w, 3) if i == 3 else (h, w)  # one colour file among gray ones
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module", params=["knn", "pca"])
def det(request):
    train = torch.rand(32, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    d = al.create(request.param, **({"k": 3} if request.param == "knn" else {"n_components": 4})).fit(train)
    d.fit_threshold(train[:16], max_fpr=0.2)
    return d


def _scores(rows):
    rows = sorted(rows, key=lambda r: r["name"])
    return [r["name"] for r in rows], torch.tensor([r["score"] for r in rows], dtype=torch.float32)


def test_shards_join_to_the_unsharded_scores(det, folder):
    files = collect_files([folder])
    names, full = _scores(iter_scores(det, files, chunk=3, batch_size=4))
    assert len(names) == len(SIZES)
    for n in (2, 3, 5):
        rows = [r for k in range(n) for r in iter_scores(det, shard(files, f"{k}/{n}"), chunk=3, batch_size=4)]
        sharded_names, sharded = _scores(rows)
        assert sharded_names == names and torch.equal(sharded, full)


def test_order_and_chunking_do_not_change_any_score(det, folder):
    files = collect_files([folder])
    names, full = _scores(iter_scores(det, files, chunk=3, batch_size=4))
    by_size = sorted(files, key=lambda p: Image.open(p).size)
    for order in (files[::-1], by_size, files[1::2] + files[::2]):
        assert torch.equal(_scores(iter_scores(det, order, chunk=3, batch_size=4))[1], full)
    assert torch.equal(_scores(iter_scores(det, files, batch_size=4))[1], full)  # chunk of 256
    single = _scores(iter_scores(det, files[4:5], batch_size=4))[1]
    assert torch.equal(single, full[4:5])


def test_each_file_is_read_at_its_own_size_and_prepared_alone(det, folder):
    files = collect_files([folder])
    rows = list(iter_scores(det, files, batch_size=4))
    assert [r["path"] for r in rows] == files and [r["name"] for r in rows] == [str(p) for p in files]
    for r in rows:
        x = prepare(torch.from_numpy(read_image(r["path"], channels=1))[None], det.input_shape_)
        assert r["score"] == pytest.approx(float(det.score(x)[0]), rel=1e-5, abs=1e-6)
        assert r["verdict"] == ("anomalous" if r["score"] > det.threshold_.value else "normal")


def test_maps_at_each_file_resolution_and_shard_independent(det, folder):
    files = collect_files([folder])
    rows = list(iter_scores(det, files, chunk=4, batch_size=4, maps=True))
    for r, (h, w) in zip(rows, SIZES):
        assert r["map"].shape == (h, w) and torch.isfinite(r["map"]).all()
    half = {r["name"]: r["map"] for r in iter_scores(det, shard(files, "1/2"), batch_size=4, maps=True)}
    for r in rows:
        if r["name"] in half:
            assert torch.equal(half[r["name"]], r["map"])


def test_a_detector_without_maps_is_a_parameter_error(folder, monkeypatch):
    d = al.create("knn", k=2).fit(torch.rand(8, 1, 12, 12))

    def no_map(x):
        raise NotImplementedError("knn on an embedding has no anomaly map")

    monkeypatch.setattr(d, "_map_batch", no_map)
    with pytest.raises(ParameterError, match="no anomaly maps"):
        list(iter_scores(d, collect_files([folder]), maps=True))
    assert all(r["verdict"] == "" for r in iter_scores(d, collect_files([folder])))  # no threshold


def test_unreadable_files_are_skipped_or_raised(det, folder, tmp_path, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    files = collect_files([folder])
    mixed = [files[0], broken, files[1], tmp_path / "gone.png"]
    with caplog.at_level(logging.WARNING):
        rows = list(iter_scores(det, mixed, batch_size=4))
    assert [r["path"] for r in rows] == files[:2]
    assert "broken.png" in caplog.text and "gone.png" in caplog.text
    full = _scores(iter_scores(det, files[:2], batch_size=4))[1]
    assert torch.equal(_scores(rows)[1], full)
    with pytest.raises(DataError, match="broken.png"):
        list(iter_scores(det, mixed, on_error="raise"))
    with pytest.raises(DataNotFoundError, match="gone.png"):
        list(iter_scores(det, [files[0], tmp_path / "gone.png"], on_error="raise"))
    assert list(iter_scores(det, [broken])) == []


def test_collect_files_and_shard_specs(folder, tmp_path):
    one = folder / "00.png"
    files = collect_files([one, folder])
    assert files[0] == one and files[1:] == sorted(folder.glob("*.png"))
    with pytest.raises(DataNotFoundError, match="nowhere"):
        collect_files([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        collect_files([tmp_path / "empty"])
    assert parse_shard("1/4") == (1, 4)
    assert shard(files, None) == files and shard(files, "0/1") == files
    assert shard(files, "1/3") == files[1::3]
    for bad in ("2/2", "a/b", "1", "-1/3", "0/0", "1/2/3"):
        with pytest.raises(ParameterError, match="shard must be K/N"):
            shard(files, bad)


def test_bad_options(det, folder):
    files = collect_files([folder])
    with pytest.raises(ParameterError, match="on_error"):
        list(iter_scores(det, files, on_error="ignore"))
    with pytest.raises(ParameterError, match="batch_size"):
        list(iter_scores(det, files, batch_size=0))
    with pytest.raises(al.detector.NotFittedError):
        list(iter_scores(al.create("pca"), files))
