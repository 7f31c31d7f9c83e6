import json

import numpy as np
import pytest

from anomalab.data.folder import load_mvtec
from anomalab.data.textures import make_textures, texture_photo


def test_make_textures_writes_mvtec_layout(tmp_path):
    out = make_textures(tmp_path, categories=("brick", "gravel"), size=32, n_train=4, n_test_good=2,
                        n_test_per_defect=2, seed=1)
    info = json.loads((out / "gravel" / "textures.json").read_text())
    assert info["category"] == "gravel" and info["train_rows"] == [0, 320] and info["seed"] == 1
    train = load_mvtec(out, "brick", "train")
    test = load_mvtec(out, "brick", "test")
    assert train.images.shape == (4, 1, 32, 32) and train.labels.sum() == 0
    assert test.images.shape == (2 + 4 * 2, 1, 32, 32)
    assert test.meta["class_names"] == ["good", "blob", "intensity_shift", "missing_patch", "scratch"]
    assert test.masks[test.labels == 0].sum() == 0
    assert (test.masks[test.labels == 1].sum((1, 2)) > 0).all()
    assert 0 <= test.images.min() and test.images.max() <= 1 and test.images.std() > 0.02


def test_same_seed_same_files_and_overwrite_guard(tmp_path):
    kw = dict(categories=("grass",), size=24, n_train=2, n_test_good=1, n_test_per_defect=1)
    make_textures(tmp_path / "a", seed=3, **kw)
    make_textures(tmp_path / "b", seed=3, **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 2 + 1 + 4 * 2
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        make_textures(tmp_path / "a", seed=3, **kw)
    make_textures(tmp_path / "a", seed=4, overwrite=True, **kw)
    # the overwrite really replaced the files: another seed, other crops and defects
    changed = [(tmp_path / "a" / f).read_bytes() != (tmp_path / "b" / f).read_bytes() for f in files]
    assert sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png")) == files
    assert all(changed)
    assert json.loads((tmp_path / "a" / "grass" / "textures.json").read_text())["seed"] == 4


def test_train_and_test_come_from_disjoint_rows(tmp_path):
    photo = texture_photo("brick")
    out = make_textures(tmp_path, categories=("brick",), size=32, n_train=3, n_test_good=3,
                        n_test_per_defect=1, seed=0)
    split = int(round(512 * 0.625))

    def rows_of(img):  # locate the crop in the photo by exact match of its top-left 4x4 block
        block = (img[0, :4, :4].numpy() * 255).round()
        ph = (photo * 255).round()
        hits = [(y, x) for y in range(512 - 31) for x in range(0, 512 - 31)
                if ph[y, x] == block[0, 0] and np.array_equal(ph[y : y + 4, x : x + 4], block)]
        assert hits, "crop not found in the photo"
        return {y for y, _ in hits}

    train = load_mvtec(out, "brick", "train")
    good = load_mvtec(out, "brick", "test").subset([0, 1, 2])
    for img in train.images[:2]:
        assert all(y + 32 <= split for y in rows_of(img))
    for img in good.images[:2]:
        assert all(y >= split for y in rows_of(img))


def test_unknown_category_and_defect(tmp_path):
    with pytest.raises(ValueError, match="unknown texture"):
        make_textures(tmp_path, categories=("wood",), n_train=1)
    with pytest.raises(ValueError, match="unknown defect"):
        make_textures(tmp_path, defects=("crack",))
