import logging

import numpy as np
import pytest
import torch
from PIL import Image

from anomalab.data import folder as folder_mod
from anomalab.data.folder import (
    Sample,
    iter_batches,
    list_images,
    list_mvtec,
    load_folder,
    load_mvtec,
    load_samples,
    read_image,
)
from anomalab.errors import DataError, DataNotFoundError, ParameterError


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


# ---- pixel values by file type -----------------------------------------------------------------------


def _big_png(path, w=14_000, h=14_000):
    """A valid 1-bit PNG of w x h blank pixels, written row by row (~24 KB on disk, nothing big in memory)."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\0" * (1 + (w + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("top", [630, 60_000])  # dark (old code stretched it by /255) and bright
def test_16bit_png_is_scaled_by_the_type_range(tmp_path, top):
    arr = np.linspace(0, top, 64, dtype=np.float64).round().astype(np.uint16).reshape(8, 8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    x = read_image(tmp_path / "a.png")
    assert x.shape == (1, 8, 8)
    np.testing.assert_array_equal(x[0], arr.astype(np.float32) / 65535.0)
    data = load_folder(tmp_path)
    assert data.images.shape == (1, 1, 8, 8) and float(data.images.max()) == pytest.approx(top / 65535)


def test_float_tiff_in_unit_range_is_taken_as_is_and_others_refused(tmp_path):
    good = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8) * 0.5
    Image.fromarray(good).save(tmp_path / "a.tif")
    x = read_image(tmp_path / "a.tif")
    np.testing.assert_array_equal(x[0], good)  # was all zeros
    resized = read_image(tmp_path / "a.tif", size=(3, 4))
    assert resized.shape == (1, 3, 4) and 0 < resized.max() <= 0.5
    Image.fromarray(good * 300).save(tmp_path / "b.tif")
    with pytest.raises(DataError, match=r"b\.tif.*\[0, 1\]"):
        read_image(tmp_path / "b.tif")
    with pytest.raises(DataError, match=r"b\.tif"):
        load_folder(tmp_path, on_error="raise")
    assert load_folder(tmp_path).names == ["good/a.tif"]  # skipped under "skip"


def test_32bit_integer_tiff_is_refused_with_the_rule(tmp_path):
    Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8)).save(tmp_path / "i.tif")
    with pytest.raises(DataError, match=r"i\.tif: 32-bit integer"):
        read_image(tmp_path / "i.tif")


def test_gray_alpha_beside_gray_files_stays_gray_and_alpha_is_dropped(tmp_path):
    gray = _png(tmp_path / "a.png", seed=1)
    lum = np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)
    alpha = np.random.default_rng(3).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(np.stack([lum, alpha], -1), "LA").save(tmp_path / "b.png")
    pal = Image.fromarray(lum).convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "c.png", transparency=0)
    data = load_folder(tmp_path)
    assert data.images.shape == (3, 1, 16, 16)
    np.testing.assert_array_equal(data.images[0, 0].numpy(), gray / np.float32(255.0))
    np.testing.assert_array_equal(data.images[1, 0].numpy(), lum / np.float32(255.0))
    np.testing.assert_array_equal(data.images[2, 0].numpy(), lum / np.float32(255.0))


def test_rgba_drops_alpha_and_reads_like_its_rgb(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    alpha = np.random.default_rng(5).integers(0, 256, (10, 12, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.png")
    _png(tmp_path / "c.png", h=10, w=12, seed=6)  # a gray file among them is repeated to RGB
    data = load_folder(tmp_path)
    assert data.images.shape == (3, 3, 10, 12)
    assert torch.equal(data.images[0], data.images[1])
    assert (data.images[2, 0] == data.images[2, 1]).all()
    gray = load_folder(tmp_path, channels=1)
    assert torch.equal(gray.images[0], gray.images[1])


def test_decompression_bomb_is_skipped_or_raised(tmp_path, caplog):
    _png(tmp_path / "a.png", seed=1)
    _big_png(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with caplog.at_level(logging.WARNING):
        data = load_folder(tmp_path)
    assert data.names == ["good/a.png"] and "bomb.png" in caplog.text
    with pytest.raises(DataError, match=r"bomb\.png"):
        load_folder(tmp_path, on_error="raise")


def test_pixel_limit_is_the_module_constant(tmp_path, monkeypatch):
    _png(tmp_path / "a.png", h=16, w=16)
    monkeypatch.setattr(folder_mod, "MAX_PIXELS", 255)
    with pytest.raises(DataError, match=r"a\.png: 16x16 .*MAX_PIXELS"):
        read_image(tmp_path / "a.png")
    monkeypatch.setattr(folder_mod, "MAX_PIXELS", 256)
    assert read_image(tmp_path / "a.png").shape == (1, 16, 16)


@pytest.mark.parametrize("bad", ["corrupt", "size"])
def test_unusable_mask_is_a_warning_naming_it(tree, caplog, bad):
    mask = tree / "cat" / "ground_truth" / "crack" / "001_mask.png"
    if bad == "corrupt":
        mask.write_bytes(b"\x89PNG broken")
    else:
        _mask(mask, h=12, w=16)
    with caplog.at_level(logging.WARNING):
        test = load_mvtec(tree, "cat", "test")
    assert len(test) == 5 and test.masks is None
    assert "001_mask.png" in caplog.text and "pixel metrics unavailable" in caplog.text


def test_size_none_is_the_most_common_size_whatever_the_order(tmp_path, caplog):
    _png(tmp_path / "0_huge.png", h=64, w=64, seed=0)  # first by name: it used to decide the size
    for i in range(3):
        _png(tmp_path / f"{i + 1}.png", h=10, w=12, seed=i + 1)
    samples = [Sample(p) for p in list_images(tmp_path)]
    with caplog.at_level(logging.WARNING):
        data = load_samples(samples)
    assert data.images.shape == (4, 1, 10, 12)
    resizing = [r for r in caplog.records if "resizing" in r.getMessage()]
    assert len(resizing) == 1 and "1 of 4" in resizing[0].getMessage()
    back = load_samples(samples[::-1])
    assert back.names == data.names[::-1]
    assert torch.equal(back.images.flip(0), data.images)


def test_size_ties_go_to_the_smallest_area(tmp_path):
    for i, (h, w) in enumerate([(20, 20), (8, 8), (20, 20), (8, 8)]):
        _png(tmp_path / f"{i}.png", h=h, w=w, seed=i)
    assert load_folder(tmp_path).shape == (1, 8, 8)
    assert folder_mod.common_size([(4, 6), (6, 4), (5, 5), (5, 5)]) == (5, 5)
    assert folder_mod.common_size([(4, 6), (6, 4)]) == (4, 6)


def test_user_errors_have_user_error_classes(tmp_path):
    with pytest.raises(DataNotFoundError):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        list_images(tmp_path / "empty")
    with pytest.raises(ParameterError, match="split"):
        list_mvtec(tmp_path, split="val")
    _png(tmp_path / "x" / "a.png")
    with pytest.raises(ParameterError, match="on_error"):
        load_folder(tmp_path / "x", on_error="ignore")
    with pytest.raises(ParameterError, match="size"):
        load_folder(tmp_path / "x", size=0)
    with pytest.raises(DataNotFoundError, match="gone.png"):
        read_image(tmp_path / "gone.png")


def test_16bit_pgm_opened_as_mode_i_is_scaled_by_the_type_range(tmp_path):
    arr = (np.arange(16, dtype=np.uint16) * 40).reshape(4, 4)  # dark: at most 600 of 65535
    (tmp_path / "a.pgm").write_bytes(b"P5\n4 4\n65535\n" + arr.astype(">u2").tobytes())  # PGM: big-endian
    assert Image.open(tmp_path / "a.pgm").mode == "I"
    np.testing.assert_array_equal(read_image(tmp_path / "a.pgm")[0], arr.astype(np.float32) / 65535.0)
