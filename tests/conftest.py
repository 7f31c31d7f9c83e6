"""Shared fixtures: tiny, seeded data built from real MNIST digits."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(min(2, torch.get_num_threads()))

from anomalab.data.mnist import load_mnist  # noqa: E402
from anomalab.types import ImageSet  # noqa: E402


@pytest.fixture(scope="session")
def mnist() -> ImageSet:
    return load_mnist()


@pytest.fixture(scope="session")
def tiny_case(mnist) -> tuple[ImageSet, ImageSet]:
    """(train: 48 real '1' digits, test: 12 other '1's (label 0) + 12 obvious anomalies (label 1):
    '1's with a bright square and uniform noise). Masks mark the square."""
    ones = mnist.subset(mnist.classes == 1)
    train = ones.subset(range(48))
    normal = ones.subset(range(48, 60))
    g = torch.Generator().manual_seed(0)
    bad = ones.images[60:72].clone()
    masks = torch.zeros(12, 28, 28)
    for i in range(12):
        r, c = torch.randint(2, 14, (2,), generator=g).tolist()
        bad[i, :, r : r + 12, c : c + 12] = 1.0
        masks[i, r : r + 12, c : c + 12] = 1.0
    bad = torch.maximum(bad, 0.5 * torch.rand(bad.shape, generator=g))
    test = ImageSet(
        images=torch.cat([normal.images, bad]),
        labels=torch.tensor([0] * 12 + [1] * 12),
        masks=torch.cat([torch.zeros(12, 28, 28), masks]),
        meta={"name": "tiny"},
    )
    train.labels = torch.zeros(len(train), dtype=torch.long)
    return train, test


def write_png(path, array) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)


def build_mvtec_tree(root, n_train: int = 24, size: int = 16):
    """<root>: n_train smooth good images, test: 6 good + 6 'scratch' with masks, size x size gray."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]

    def good():
        return 100 + 40 * np.sin(xx / 3 + rng.uniform(0, 6)) + rng.normal(0, 3, (size, size))

    for i in range(n_train):
        write_png(root / "train" / "good" / f"{i:03d}.png", good())
    for i in range(6):
        write_png(root / "test" / "good" / f"{i:03d}.png", good())
        img, mask = good(), np.zeros((size, size))
        img[3:13, 7:9] = 255
        mask[3:13, 7:9] = 255
        write_png(root / "test" / "scratch" / f"{i:03d}.png", img)
        write_png(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture(scope="module")
def mvtec_tree(tmp_path_factory):
    return build_mvtec_tree(tmp_path_factory.mktemp("data") / "widget")


@pytest.fixture(scope="module")
def knn_run(mvtec_tree, tmp_path_factory):
    """A finished knn run (k=3, no figures) on the module's tiny MVTec tree, fitted once per module."""
    out = tmp_path_factory.mktemp("knn") / "run"
    code, text = cli("fit", "knn", "k=3", "--data", mvtec_tree, "--out", out, "--no-figures")
    assert code == 0, text
    return out


def cli(*args):
    """(exit code, output) of `anomalab ARGS` run in-process."""
    from click.testing import CliRunner

    from anomalab.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output
