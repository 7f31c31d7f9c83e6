"""Shared fixtures: tiny, seeded data built from real MNIST digits."""

from __future__ import annotations

import os

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
