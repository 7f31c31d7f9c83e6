"""`make-defects`: a labelled MVTec-layout test set from a folder of good images; and the messages a user
gets when a folder is not what a data spec expects."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from anomalab.cli import main
from anomalab.data.folder import load_folder, read_image
from anomalab.data.make_defects import MARKER, make_defects
from anomalab.data.specs import check_spec
from anomalab.errors import DataError, ParameterError, RunFolderError

KINDS = ("scratch", "blob", "missing_patch", "intensity_shift")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """30 smooth gray 48x48 'parts' (stripes with noise)."""
    folder = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    for i in range(30):
        img = 120 + 50 * np.sin(xx / 4 + rng.uniform(0, 6)) + rng.normal(0, 4, (48, 48))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"part{i:02d}.png")
    return folder


def _pixels(path):
    return np.asarray(Image.open(path)).astype(np.int64)


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_layout_and_record(good, tmp_path):
    out = tmp_path / "set"
    record = make_defects(good, out, kinds=("scratch", "blob"), n=6, seed=1)
    train = sorted(p.name for p in (out / "train" / "good").iterdir())
    held = sorted(p.stem for p in (out / "test" / "good").iterdir())
    assert len(train) == 24 and len(held) == 6 and not set(held) & {t[:-4] for t in train}
    assert sorted(train + [h + ".png" for h in held]) == sorted(p.name for p in good.iterdir())
    for kind in ("scratch", "blob"):
        assert sorted(p.stem for p in (out / "test" / kind).iterdir()) == held
        assert sorted(p.name for p in (out / "ground_truth" / kind).iterdir()) == [f"{h}_mask.png" for h in held]
    assert not (out / "test" / "missing_patch").exists()
    assert (out / "train" / "good" / train[0]).read_bytes() == (good / train[0]).read_bytes()  # copies
    saved = json.loads((out / MARKER).read_text())
    assert saved == record and saved["kinds"] == ["scratch", "blob"] and saved["n_train"] == 24
    # the same seed holds out the same images and paints the same defects
    again = make_defects(good, tmp_path / "again", kinds=("scratch", "blob"), n=6, seed=1)
    assert again["held_out"] == record["held_out"]
    name = f"{held[0]}.png"
    assert np.array_equal(_pixels(out / "test" / "blob" / name), _pixels(tmp_path / "again" / "test" / "blob" / name))


@pytest.mark.parametrize("kind", KINDS)
def test_masks_cover_exactly_the_changed_pixels(good, tmp_path, kind):
    out = tmp_path / kind
    make_defects(good, out, kinds=(kind,), n=5)
    covered = []
    for twin in sorted((out / "test" / "good").iterdir()):
        changed = _pixels(out / "test" / kind / twin.name) != _pixels(twin)
        mask = _pixels(out / "ground_truth" / kind / f"{twin.stem}_mask.png") > 127
        assert mask.any()
        assert not (changed & ~mask).any()  # every changed pixel is marked
        covered.append(changed[mask].mean())
    assert np.mean(covered) > 0.5, covered  # and most marked pixels changed


def test_degree_scales_the_strength_of_the_same_defects(good, tmp_path):
    diffs, masks = {}, {}
    for degree in (0.0, 0.3, 1.0):
        out = tmp_path / f"d{degree}"
        make_defects(good, out, kinds=("blob", "intensity_shift"), n=5, degree=degree, seed=3)
        for kind in ("blob", "intensity_shift"):
            total, region = 0.0, []
            for twin in sorted((out / "test" / "good").iterdir()):
                bad = _pixels(out / "test" / kind / twin.name)
                total += np.abs(bad - _pixels(twin)).sum()
                region.append(_pixels(out / "ground_truth" / kind / f"{twin.stem}_mask.png") > 127)
            diffs[degree, kind] = total
            masks[degree, kind] = region
    for kind in ("blob", "intensity_shift"):
        assert diffs[0.0, kind] == 0  # degree 0 changes nothing
        assert diffs[0.0, kind] < diffs[0.3, kind] < diffs[1.0, kind]
        for m0, m1 in zip(masks[0.0, kind], masks[1.0, kind]):  # same places: the strong one only adds a rim
            assert not (m0 & ~m1).any() and not (m1 & ~ndimage.binary_dilation(m0, iterations=2)).any()


def test_rgb_and_16_bit_images_keep_their_type(tmp_path):
    rgb, deep = tmp_path / "rgb", tmp_path / "deep"
    rgb.mkdir()
    deep.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(60, 200, (32, 40, 3), dtype=np.uint8)).save(rgb / f"{i}.jpg")
        Image.fromarray(rng.integers(10_000, 50_000, (32, 32), dtype=np.uint16)).save(deep / f"{i}.png")
    make_defects(rgb, tmp_path / "rgb_out", kinds=("scratch",), n=2)
    twin = next((tmp_path / "rgb_out" / "test" / "good").iterdir())
    assert read_image(twin).shape == (3, 32, 40)
    assert np.array_equal(read_image(twin), read_image(rgb / f"{twin.stem}.jpg"))  # the decoded file, lossless
    make_defects(deep, tmp_path / "deep_out", kinds=("blob",), n=2, degree=0.0)
    twin = next((tmp_path / "deep_out" / "test" / "good").iterdir())
    assert Image.open(twin).mode.startswith("I") and np.array_equal(read_image(twin), read_image(deep / twin.name))
    assert np.array_equal(_pixels(twin), _pixels(tmp_path / "deep_out" / "test" / "blob" / twin.name))


def test_refusals(good, tmp_path):
    with pytest.raises(RunFolderError):
        make_defects(good, good, kinds=("blob",), n=2)  # never into its input
    with pytest.raises(RunFolderError):
        make_defects(good, good / "inside", kinds=("blob",), n=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not an anomalab"):
        make_defects(good, foreign, kinds=("blob",), n=2, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    make_defects(good, ours, kinds=("blob",), n=2)
    with pytest.raises(RunFolderError, match="--overwrite"):
        make_defects(good, ours, kinds=("blob",), n=3)
    make_defects(good, ours, kinds=("scratch",), n=3, overwrite=True)  # only a folder it wrote
    assert sorted(p.name for p in (ours / "test").iterdir()) == ["good", "scratch"]
    with pytest.raises(DataError, match="--n 29"):
        make_defects(good, tmp_path / "big", kinds=("blob",), n=29)  # 1 image left to train on
    for bad in (dict(kinds=()), dict(kinds=("dent",)), dict(n=0), dict(degree=1.5), dict(seed=-1)):
        with pytest.raises(ParameterError):
            make_defects(good, tmp_path / "bad", **{"kinds": ("blob",), "n": 2, **bad})
    assert not (tmp_path / "big").exists() and not (tmp_path / "bad").exists()


def test_unreadable_files_are_skipped_with_one_warning(good, tmp_path, caplog):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in sorted(good.iterdir())[:8]:
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        record = make_defects(mixed, tmp_path / "out", kinds=("blob",), n=3)
    assert record["skipped"] == ["broken.png"] and record["n_train"] == 5
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1


def test_cli_end_to_end_with_knn(good, tmp_path):
    out = tmp_path / "set"
    code, text = _run("make-defects", good, "--kind", "scratch", "--kind", "missing_patch", "--n", "6",
                      "--degree", "1", "--out", out, "--seed", "2")
    assert code == 0, text
    assert "24 training images" in text and "anomalab fit" in text
    code, text = _run("fit", "knn", "k=3", "--data", out, "--out", tmp_path / "run", "--no-figures")
    assert code == 0, text
    assert "image_auroc=" in text and "pixel_auroc=" in text
    code, text = _run("make-defects", good, "--kind", "scratch", "--n", "2", "--out", out)
    assert code == 2 and text.startswith("error:") and "--overwrite" in text
    code, text = _run("make-defects", good, "--kind", "dent", "--n", "2", "--out", tmp_path / "x")
    assert code == 2 and "dent" in text
    code, text = _run("make-defects", good, "--kind", "blob", "--n", "2", "--degree", "2", "--out", tmp_path / "x")
    assert code == 2 and not (tmp_path / "x").exists()


# ---- messages about folders ------------------------------------------------------------------------------
def test_an_mvtec_root_lists_its_categories(good, tmp_path):
    root = tmp_path / "mvtec"
    for cat in ("bottle", "cable"):
        make_defects(good, root / cat, kinds=("blob",), n=2)
    with pytest.raises(DataError, match=r"categories \(bottle, cable\); pass one category folder") as e:
        check_spec(str(root))
    assert str(root / "bottle") in str(e.value)
    code, text = _run("fit", "knn", "--data", root, "--out", tmp_path / "r")
    assert code == 2 and "bottle, cable" in text and not (tmp_path / "r").exists()
    with pytest.raises(DataError, match="bottle, cable"):
        load_folder(root)
    with pytest.raises(DataError, match="train/good"):
        load_folder(root / "bottle")  # a category is not a plain folder


def test_skipped_subfolders_get_one_warning(good, tmp_path, caplog):
    folder = tmp_path / "plain"
    folder.mkdir()
    for p in sorted(good.iterdir())[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "old").mkdir()
    (folder / "rejects").mkdir()
    with caplog.at_level(logging.WARNING):
        assert len(load_folder(folder)) == 4
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warned) == 1 and "old, rejects" in warned[0]
    nested = tmp_path / "nested"
    (nested / "day1").mkdir(parents=True)
    with pytest.raises(DataError, match="subfolders \\(day1\\)"):
        load_folder(nested)
