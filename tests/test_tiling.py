"""Tiled scoring (anomalab.tiling): the grid, stitching, a small defect kept at full resolution, and the
tiled run through fit -> score -> predict at the images' own non-square size."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from conftest import cli, write_png
from PIL import Image

from anomalab.errors import DataError, NotSupportedError, ParameterError
from anomalab.registry import create, load
from anomalab.tiling import TiledDetector, stitch, tile_grid, tiles


# ---- the grid --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,tile,overlap", [(64, 64, 64, 0), (100, 64, 32, 8), (256, 384, 64, 16),
                                              (37, 211, 37, 5), (50, 90, 16, 15), (65, 33, 32, 0)])
def test_grid_covers_every_pixel_with_full_tiles_ending_at_the_borders(h, w, tile, overlap):
    grid = tile_grid(h, w, tile, overlap)
    cover = np.zeros((h, w), dtype=int)
    for top, left in grid:
        assert 0 <= top <= h - tile and 0 <= left <= w - tile  # every tile full-size, inside the image
        cover[top : top + tile, left : left + tile] += 1
    assert cover.min() >= 1  # every pixel
    tops, lefts = sorted({t for t, _ in grid}), sorted({s for _, s in grid})
    assert tops[0] == 0 and lefts[0] == 0 and tops[-1] == h - tile and lefts[-1] == w - tile
    assert len(grid) == len(tops) * len(lefts)
    for starts, length in ((tops, h), (lefts, w)):
        gaps = np.diff(starts)
        assert (gaps <= tile - overlap).all() and (gaps > 0).all()  # neighbours share at least `overlap`
        # as few tiles as the stride allows: all but the last step are exactly the stride
        assert (gaps[:-1] == tile - overlap).all()
        assert len(starts) == max(1, int(np.ceil((length - tile) / (tile - overlap))) + 1)


def test_bad_tilings_are_one_line_errors():
    with pytest.raises(ParameterError, match="overlap must be smaller than the tile"):
        tile_grid(100, 100, 32, 32)
    with pytest.raises(ParameterError, match="tile must be a positive integer"):
        tile_grid(100, 100, 0)
    with pytest.raises(DataError, match=r"40x90 \(H x W\) image is smaller than the 64x64 tile"):
        tile_grid(40, 90, 64, 8)
    with pytest.raises(ParameterError):
        TiledDetector(create("knn"), 32, -1)


# ---- stitching -------------------------------------------------------------------------------------------
def test_stitching_the_tiles_of_a_ramp_gives_it_back_exactly():
    h, w = 70, 131
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ramp = (0.001 * yy + 0.0137 * xx + 1 / 3).float()
    for tile, overlap in ((32, 8), (32, 0), (17, 16), (70, 3)):
        grid = tile_grid(h, w, tile, overlap)
        got = stitch(tiles(ramp[None], tile, overlap)[:, 0], grid, (h, w))
        assert got.shape == (h, w) and torch.equal(got, ramp)


def test_overlaps_are_averaged():
    grid = tile_grid(10, 16, 10, 4)  # two tiles side by side: columns 0-9 and 6-15
    assert grid == [(0, 0), (0, 6)]
    maps = torch.stack([torch.full((10, 10), 1.0), torch.full((10, 10), 4.0)])
    got = stitch(maps, grid, (10, 16))
    assert (got[:, :6] == 1).all() and (got[:, 6:10] == 2.5).all() and (got[:, 10:] == 4).all()
    with pytest.raises(ParameterError, match="do not cover"):
        stitch(maps[:1], grid[:1], (10, 16))  # negative control: a missing tile is noticed


# ---- a small defect in a large image ---------------------------------------------------------------------
H, W = 256, 384


def _texture(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    a = (0.5 + 0.15 * np.sin(xx / 2.5 + rng.uniform(0, 6)) * np.sin(yy / 3.0 + rng.uniform(0, 6))
         + rng.normal(0, 0.03, (H, W)))
    return np.clip(a, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def defect_case():
    """4 training textures; 8 normal and 8 test images with one 6-px-wide blob each; the blob centres."""
    rng = np.random.default_rng(0)
    train = torch.from_numpy(np.stack([_texture(rng) for _ in range(4)]))[:, None]
    normal = torch.from_numpy(np.stack([_texture(rng) for _ in range(8)]))[:, None]
    bad, centres = normal.clone(), []
    yy, xx = np.mgrid[:H, :W]
    for i in range(len(bad)):
        cy, cx = 30 + 25 * i, 40 + 40 * i
        blob = torch.from_numpy((yy - cy) ** 2 + (xx - cx) ** 2 <= 9)
        bad[i, 0][blob] = 0.85
        centres.append((cy, cx))
    return train, normal, bad, centres


def test_a_small_defect_is_found_at_full_resolution_but_lost_when_shrunk(defect_case):
    from anomalab.metrics import image_auroc

    train, normal, bad, centres = defect_case
    tiled = TiledDetector(create("patchcore", image_size=64), 64, 16).fit(train)
    whole = create("patchcore", image_size=64).fit(train)  # the same detector on the image shrunk to 64x64
    labels = np.r_[np.zeros(len(normal)), np.ones(len(bad))]
    t_normal, t_bad = tiled.score(normal).numpy(), tiled.score(bad).numpy()
    w_normal, w_bad = whole.score(normal).numpy(), whole.score(bad).numpy()
    # tiled: every defective image above every normal one; shrunk: some defects sink among the normals
    assert t_bad.min() - t_normal.max() > 0.3
    assert w_bad.min() - w_normal.max() < 0
    assert image_auroc(labels, np.r_[t_normal, t_bad]) == 1.0
    assert image_auroc(labels, np.r_[w_normal, w_bad]) < 0.9
    # and the stitched full-resolution map puts its hottest pixel on the blob
    maps = tiled.score_map(bad)
    assert maps.shape == (len(bad), H, W)
    for amap, (cy, cx) in zip(maps, centres):
        y, x = divmod(int(amap.argmax()), W)
        assert abs(y - cy) <= 16 and abs(x - cx) <= 16  # within a quarter tile, in a 256x384 image


def test_score_is_the_max_over_tiles_computed_independently(defect_case):
    train, normal, bad, _ = defect_case
    inner = create("patchcore", image_size=64)
    det = TiledDetector(inner, 64, 16).fit(train[:2])
    image = bad[3]
    cut = []
    for top in [0, 48, 96, 144, 192]:  # 256 rows: stride 48, the last start 192 ends at the border
        for left in [0, 48, 96, 144, 192, 240, 288, 320]:  # 384 columns: the last start is 384 - 64
            cut.append(image[:, top : top + 64, left : left + 64])
    cut = torch.stack(cut)
    by_tile = inner.score(cut)
    assert torch.isclose(det.score(image[None])[0], by_tile.max(), rtol=1e-5)
    # the map: tile maps placed and averaged here with numpy
    tile_maps = inner.score_map(cut).double().numpy()
    total, count, k = np.zeros((H, W)), np.zeros((H, W)), 0
    for top in [0, 48, 96, 144, 192]:
        for left in [0, 48, 96, 144, 192, 240, 288, 320]:
            total[top : top + 64, left : left + 64] += tile_maps[k]
            count[top : top + 64, left : left + 64] += 1
            k += 1
    np.testing.assert_allclose(det.score_map(image[None])[0].numpy(), total / count, rtol=1e-5, atol=1e-6)


def test_save_and_load_give_identical_scores_and_drop_tiling_when_saved_untiled(defect_case, tmp_path):
    train, normal, bad, _ = defect_case
    det = TiledDetector(create("patchcore", image_size=64), 64, 16).fit(train[:2])
    det.fit_threshold(normal[:4], max_fpr=0.25, pixel=True)
    det.save(tmp_path / "d")
    back = load(tmp_path / "d")
    assert isinstance(back, TiledDetector) and back.tiling() == {"tile": 64, "overlap": 16}
    assert torch.equal(back.score(bad), det.score(bad))
    assert torch.equal(back.score_map(bad[:2]), det.score_map(bad[:2]))
    assert back.threshold_.to_dict() == det.threshold_.to_dict()
    det.detector.save(tmp_path / "d")  # the wrapped detector saved on its own over it: no longer tiled
    assert not isinstance(load(tmp_path / "d"), TiledDetector)


def _no_maps(self, x):
    raise NotImplementedError("no maps here")


def test_a_tiled_detector_without_maps_gives_image_scores_only(defect_case, monkeypatch):
    from anomalab.detectors.knn import KNN

    monkeypatch.setattr(KNN, "_map_batch", _no_maps)
    train, normal, _, _ = defect_case
    det = TiledDetector(create("knn", k=1), 64, 0).fit(train[:2])
    assert det.score(normal[:2]).shape == (2,)
    with pytest.raises(NotImplementedError, match="image scores only"):
        det.score_map(normal[:1])


# ---- the run: fit --tile -> score -> predict ---------------------------------------------------------------
RH, RW = 40, 88  # non-square


@pytest.fixture(scope="module")
def tiled_data(tmp_path_factory):
    """An MVTec-layout folder of 40x88 gray textures: 10 train, test 3 good + 3 with a small bright blob."""
    root = tmp_path_factory.mktemp("tiled") / "plate"
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:RH, :RW]

    def good():
        return 120 + 30 * np.sin(xx / 2.0 + rng.uniform(0, 6)) * np.sin(yy / 2.5) + rng.normal(0, 3, (RH, RW))

    for i in range(10):
        write_png(root / "train" / "good" / f"{i:03d}.png", good())
    for i in range(3):
        write_png(root / "test" / "good" / f"{i:03d}.png", good())
        img, mask = good(), np.zeros((RH, RW))
        spot = (yy - 20) ** 2 + (xx - 20 - 20 * i) ** 2 <= 4
        img[spot], mask[spot] = 250, 255
        write_png(root / "test" / "spot" / f"{i:03d}.png", img)
        write_png(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    small = tmp_path_factory.mktemp("small")
    write_png(small / "tiny.png", np.full((20, 60), 120.0))
    return root, small


@pytest.fixture(scope="module")
def tiled_run(tiled_data, tmp_path_factory):
    root, _ = tiled_data
    out = tmp_path_factory.mktemp("runs") / "tiled"
    code, text = cli("fit", "patchcore", "--data", root, "--out", out, "--tile", 32, "--overlap", 8,
                     "--no-figures", "image_size=32")
    assert code == 0, text
    return out


def test_fit_records_the_tiling_and_evaluates_at_full_resolution(tiled_run):
    config = json.loads((tiled_run / "config.json").read_text())
    assert (config["tile"], config["overlap"]) == (32, 8)
    assert json.loads((tiled_run / "detector" / "tiling.json").read_text())["tile"] == 32
    ev = json.loads((tiled_run / "evaluation.json").read_text())
    assert "pixel_auroc" in ev["metrics"]  # maps and masks at the images' own 40x88
    assert ev["metrics"]["image_auroc"] == 1.0


def test_score_of_a_tiled_run_is_the_max_over_its_tiles(tiled_run, tiled_data):
    from anomalab.data.folder import read_image

    root, small = tiled_data
    code, text = cli("score", tiled_run, root / "test" / "good", root / "test" / "spot", small)
    assert code == 0, text
    rows = list(csv.DictReader(io.StringIO(text[text.index("name,"):])))
    assert len(rows) == 6  # tiny.png (20x60, smaller than a tile) skipped
    det = load(tiled_run)
    inner = det.detector
    for row in rows:
        image = torch.from_numpy(read_image(row["name"], channels=1))
        cut = torch.stack([image[:, t : t + 32, s : s + 32] for t in (0, 8) for s in (0, 24, 48, 56)])
        # the CLI scores several images' tiles per backbone call, this loop one image's: float32 convolutions
        # and the matrix-product distances (|a|^2 - 2ab + |b|^2, cancellation near the bank) then differ by
        # ~1e-5 relative; a wrong reduction (mean over tiles, another grid) is off by far more than 1e-4
        per_tile = inner.score(cut)
        assert float(row["score"]) == pytest.approx(float(per_tile.max()), rel=1e-4)
        assert float(row["score"]) != pytest.approx(float(per_tile.mean()), rel=1e-4)
        thr = det.threshold_.value
        assert row["verdict"] == ("anomalous" if float(row["score"]) > thr else "normal")
    code, text = cli("score", tiled_run, small, "--strict")
    assert code == 2 and "smaller than the run's 32x32 tiles" in text


def test_predict_writes_full_resolution_non_square_overlays_and_masks(tiled_run, tiled_data, tmp_path):
    root, _ = tiled_data
    code, text = cli("predict", tiled_run, root / "test" / "good", root / "test" / "spot", "--out", tmp_path / "p")
    assert code == 0, text
    rows = list(csv.DictReader((tmp_path / "p" / "predictions.csv").open()))
    assert len(rows) == 6
    det = load(tiled_run)
    for row in rows:
        over = np.asarray(Image.open(tmp_path / "p" / row["overlay"]))
        msk = np.asarray(Image.open(tmp_path / "p" / row["mask"]))
        assert over.shape == (RH, RW, 3) and msk.shape == (RH, RW)
        from anomalab.data.folder import read_image

        amap = det.score_map(torch.from_numpy(read_image(row["path"], channels=1))[None])[0].numpy()
        assert np.array_equal(msk > 0, amap > det.threshold_.pixel_value)
    spots = [r for r in rows if "/spot/" in r["path"]]
    assert all(r["verdict"] == "anomalous" for r in spots)


def test_tiled_fit_refuses_bad_options_in_one_line(tiled_data, tmp_path):
    root, _ = tiled_data
    code, text = cli("fit", "knn", "--data", root, "--out", tmp_path / "a", "--tile", 32, "--overlap", 32)
    assert code == 2 and "overlap must be smaller than the tile" in text and len(text.strip().splitlines()) == 1
    code, text = cli("fit", "knn", "--data", root, "--out", tmp_path / "b", "--tile", 64)
    assert code == 2 and "--tile 64 is larger than the 40x88" in text
    assert not (tmp_path / "b").exists()
    code, text = cli("fit", "knn", "--data", root, "--out", tmp_path / "c", "--overlap", 4)
    assert code == 2 and "--overlap needs --tile" in text


def test_a_tiled_run_without_maps_predicts_verdicts_only(tiled_data, tmp_path, monkeypatch):
    from anomalab.detectors.knn import KNN

    monkeypatch.setattr(KNN, "_map_batch", _no_maps)
    root, _ = tiled_data
    code, text = cli("fit", "knn", "--data", root, "--out", tmp_path / "k", "--tile", 32, "--no-figures", "k=1")
    assert code == 0, text
    code, text = cli("predict", tmp_path / "k", root / "test" / "spot", "--out", tmp_path / "p")
    assert code == 0 and "gives no anomaly maps" in text
    assert not (tmp_path / "p" / "overlays").exists()


def test_serve_and_export_refuse_a_tiled_run(tiled_run, tmp_path):
    from anomalab.serve.model import ServedModel

    with pytest.raises(NotSupportedError, match="tiled run"):
        ServedModel(tiled_run)
    code, text = cli("export", tiled_run, "--out", tmp_path / "m.onnx")
    assert code == 2 and "tiled detector cannot be exported" in text
