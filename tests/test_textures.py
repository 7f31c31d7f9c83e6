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


def test_strided_split_is_every_grid_window_of_each_half(tmp_path):
    from anomalab.data.textures import make_strided
    from anomalab.errors import ParameterError, RunFolderError

    root = make_strided(tmp_path, crop=128, train_stride=64, test_stride=64, seed=3)
    assert root == tmp_path / "brick_strided"
    train, test = load_mvtec(tmp_path, "brick_strided", "train"), load_mvtec(tmp_path, "brick_strided", "test")
    photo = texture_photo("brick")
    # top half (256 rows), 64 px grid: 3 x 7 windows; bottom half: the same count
    assert len(train) == 21 and len(test) == 21 and train.images.shape[-2:] == (128, 128)
    first = np.asarray(train.images[0, 0])
    np.testing.assert_allclose(first, photo[:128, :128], atol=1 / 255 + 1e-6)  # the window at (0, 0)
    bottom = [photo[y : y + 128, x : x + 128] for y in range(256, 385, 64) for x in range(0, 385, 64)]
    info = json.loads((root / "textures.json").read_text())
    bad = {int(k): v for k, v in info["defective"].items()}
    assert len(bad) == 10 and set(bad.values()) == {"scratch", "blob"} and info["test_rows"] == [256, 512]
    good = [i for i in range(21) if i not in bad]
    names = sorted((root / "test" / "good").iterdir())
    assert [int(p.stem) for p in names] == good
    for p in names[:3]:  # a good test crop is its bottom-half window, unchanged
        from PIL import Image

        np.testing.assert_allclose(np.asarray(Image.open(p), dtype=np.float32) / 255, bottom[int(p.stem)],
                                   atol=1 / 255 + 1e-6)
    assert test.masks[test.labels == 1].flatten(1).amax(1).min() > 0 and test.masks[test.labels == 0].sum() == 0
    again = make_strided(tmp_path / "b", crop=128, train_stride=64, test_stride=64, seed=3)
    assert json.loads((again / "textures.json").read_text())["defective"] == info["defective"]  # seeded
    with pytest.raises(RunFolderError):
        make_strided(tmp_path, crop=128, train_stride=64, test_stride=64)
    with pytest.raises(ParameterError, match="unknown defect"):
        make_strided(tmp_path / "c", defects=("dent",))


def test_a_category_is_the_same_whether_built_alone_or_with_the_others(tmp_path):
    kw = dict(size=32, n_train=3, n_test_good=2, n_test_per_defect=1)
    make_textures(tmp_path / "all", **kw)
    make_textures(tmp_path / "one", categories=("gravel",), **kw)
    a = sorted((tmp_path / "all" / "gravel").rglob("*.png"))
    b = sorted((tmp_path / "one" / "gravel").rglob("*.png"))
    assert [p.relative_to(tmp_path / "all") for p in a] == [p.relative_to(tmp_path / "one") for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    # negative control: another seed gives other files
    make_textures(tmp_path / "other", categories=("gravel",), seed=1, **kw)
    c = sorted((tmp_path / "other" / "gravel").rglob("*.png"))
    assert any(x.read_bytes() != y.read_bytes() for x, y in zip(a, c))
