import logging

import numpy as np
import pytest
from PIL import Image

from anomalab.data.folder import iter_batches, list_images, list_mvtec, load_folder, load_mvtec


def _png(path, h=16, w=16, rgb=False, value=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if rgb else (h, w)
    arr = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _mask(path, h=16, w=16, box=(2, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    m[box[0] : box[1], box[0] : box[1]] = 255
    Image.fromarray(m).save(path)


@pytest.fixture
def tree(tmp_path):
    """cat/train/good (3 + a corrupt file + a text file), test/good (2), test/crack (2, masks
    `<name>_mask.png`), test/hole (1, mask named like the image)."""
    cat = tmp_path / "cat"
    for i in range(3):
        _png(cat / "train" / "good" / f"{i:03d}.png", seed=i)
    (cat / "train" / "good" / "broken.png").write_bytes(b"not a png at all")
    (cat / "train" / "good" / "notes.txt").write_text("ignored: not an image suffix")
    for i in range(2):
        _png(cat / "test" / "good" / f"{i:03d}.png", seed=10 + i)
        _png(cat / "test" / "crack" / f"{i:03d}.png", seed=20 + i)
        _mask(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    _png(cat / "test" / "hole" / "a.png", seed=30)
    _mask(cat / "ground_truth" / "hole" / "a.png", box=(8, 12))
    return tmp_path


def test_train_split_skips_corrupt_file_with_warning(tree, caplog):
    with caplog.at_level(logging.WARNING):
        train = load_mvtec(tree, "cat", "train")
    assert train.images.shape == (3, 1, 16, 16)
    assert train.labels.tolist() == [0, 0, 0] and train.masks is None
    assert "broken.png" in caplog.text
    raw = np.asarray(Image.open(tree / "cat" / "train" / "good" / "001.png"), np.float32) / 255
    assert np.allclose(train.images[1, 0].numpy(), raw)


def test_corrupt_file_raises_when_asked(tree):
    with pytest.raises(ValueError, match="broken.png"):
        load_mvtec(tree, "cat", "train", on_error="raise")


def test_test_split_labels_classes_and_both_mask_namings(tree):
    test = load_mvtec(tree / "cat", split="test")  # the category folder itself also works
    assert test.meta["class_names"] == ["good", "crack", "hole"]
    assert test.labels.tolist() == [0, 0, 1, 1, 1]
    assert test.classes.tolist() == [0, 0, 1, 1, 2]
    assert test.masks.shape == (5, 16, 16)
    assert test.masks[:2].sum() == 0
    assert test.masks[2].sum() == 16 and test.masks[2, 2, 2] == 1  # crack: <name>_mask.png
    assert test.masks[4].sum() == 16 and test.masks[4, 8, 8] == 1  # hole: mask named like the image
    assert test.names[4] == "hole/a.png"


def test_resize_and_channels_on_load(tree):
    test = load_mvtec(tree, "cat", "test", size=8, channels=3)
    assert test.images.shape == (5, 3, 8, 8) and test.masks.shape == (5, 8, 8)
    assert set(test.masks.unique().tolist()) == {0.0, 1.0}
    assert test.masks[2].sum() == 4  # the 4x4 box at half size
    assert (test.images[:, 0] == test.images[:, 1]).all()  # gray repeated
    rect = load_mvtec(tree, "cat", "train", size=(6, 10))
    assert rect.images.shape == (3, 1, 6, 10)


def test_rgb_and_mixed_sizes(tmp_path, caplog):
    folder = tmp_path / "mine"
    a = _png(folder / "a.png", h=10, w=12, rgb=True, seed=1)
    _png(folder / "b.jpg", h=20, w=24, rgb=True, seed=2)
    _png(folder / "c.png", h=10, w=12, seed=3)  # a gray one among colour ones
    with caplog.at_level(logging.WARNING):
        data = load_folder(folder)
    assert data.images.shape == (3, 3, 10, 12) and "resizing" in caplog.text
    assert np.allclose(data.images[0].numpy().transpose(1, 2, 0), a / 255.0)
    gray = load_folder(folder, channels=1, size=5)
    assert gray.images.shape == (3, 1, 5, 5)


def test_missing_and_empty_folders_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load_mvtec(tmp_path, "cat")
    (tmp_path / "cat" / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match="no defect-type folders"):
        load_mvtec(tmp_path, "cat", "test")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could be read"):
        load_folder(tmp_path / "junk")


def test_streaming_batches_match_full_load(tree):
    samples = list_mvtec(tree, "cat", "test")
    full = load_mvtec(tree, "cat", "test", size=16, channels=1)
    parts = list(iter_batches(samples, batch_size=2, size=16, channels=1))
    assert [len(p) for p in parts] == [2, 2, 1]
    assert np.array_equal(np.concatenate([p.images.numpy() for p in parts]), full.images.numpy())
