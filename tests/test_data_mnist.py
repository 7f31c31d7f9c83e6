import gzip

import numpy as np
import pytest

from anomalab.data.mnist import load_mnist, read_idx
from anomalab.data.splits import one_class_split
from anomalab.data.transforms import prepare


def _write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_loader(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for stem, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)
    ds = load_mnist(tmp_path)
    assert ds.images.shape == (10, 1, 28, 28) and ds.images.max() <= 1
    assert ds.classes.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert len(load_mnist(tmp_path, "test")) == 4
    assert read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}").shape == (6, 28, 28)


def test_idx_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_packaged_digits_are_real_mnist(mnist):
    assert mnist.images.shape == (5000, 1, 28, 28)
    assert np.bincount(mnist.classes.numpy()).tolist() == [500] * 10
    # real handwriting: mean ink per image of the '1's is far below that of the '0's
    ink = mnist.images.mean((1, 2, 3))
    assert ink[mnist.classes == 1].mean() < 0.7 * ink[mnist.classes == 0].mean()


def test_one_class_split_follows_the_ganomaly_protocol(mnist):
    train, test = one_class_split(mnist, anomaly_digit=3, train_frac=0.8, seed=1)
    assert len(train) == 3600 and (train.classes != 3).all() and (train.labels == 0).all()
    assert (test.labels == 1).sum() == 500 and (test.labels == (test.classes == 3).long()).all()
    assert len(test) == 900 + 500
    assert not set(train.names) & set(test.names)
    again, _ = one_class_split(mnist, anomaly_digit=3, seed=1)
    assert again.names == train.names
    other, _ = one_class_split(mnist, anomaly_digit=3, seed=2)
    assert other.names != train.names


def test_prepare_converts_size_and_channels():
    import torch

    x = torch.rand(2, 1, 28, 28)
    y = prepare(x, (3, 32, 32))
    assert y.shape == (2, 3, 32, 32) and torch.equal(y[:, 0], y[:, 1])
    g = prepare(torch.rand(2, 3, 16, 16), (1, 16, 16))
    assert g.shape == (2, 1, 16, 16)
