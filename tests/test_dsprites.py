import numpy as np
import pytest
import torch

from anomalab.data.dsprites import (
    ADDED_ORIENTATION_INDEX,
    ADDED_SCALE_INDEX,
    ColouredDSprites,
    DSprites,
    WhiteDSprites,
    added_factors,
    colourise,
)


def _extent(img: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_grid_size_and_index_order():
    d = DSprites()
    assert len(d) == 737_280 == 3 * 6 * 40 * 32 * 32
    assert d.factors_from_index(0).tolist() == [[0, 0, 0, 0, 0]]
    assert d.factors_from_index(1).tolist() == [[0, 0, 0, 0, 1]]  # posY fastest
    assert d.factors_from_index(32).tolist() == [[0, 0, 0, 1, 0]]
    assert d.factors_from_index(len(d) - 1).tolist() == [[2, 5, 39, 31, 31]]
    idx = np.random.default_rng(0).integers(0, len(d), 1000)
    np.testing.assert_array_equal(d.index_from_factors(d.factors_from_index(idx)), idx)


def test_images_are_binary_64x64_and_positions_move_the_right_axis():
    d = DSprites()
    x = d.images_from_factors(np.array([[0, 5, 0, 0, 0], [0, 5, 0, 1, 0], [0, 5, 0, 0, 1], [0, 5, 0, 31, 31]]))
    assert x.shape == (4, 1, 64, 64) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {0.0, 1.0}
    base = x[0, 0].numpy()
    np.testing.assert_array_equal(np.roll(base, 1, axis=1), x[1, 0].numpy())  # posX = column axis
    np.testing.assert_array_equal(np.roll(base, 1, axis=0), x[2, 0].numpy())  # posY = row axis
    r0, r1, c0, c1 = _extent(x[3, 0].numpy())
    assert r1 < 64 and c1 < 64 and (r0 + r1) / 2 == pytest.approx(47, abs=0.5)  # centres span 16..47


def test_shape_sizes_and_orientation():
    d = DSprites()
    x = d.images_from_factors(np.array([[0, 5, 0, 16, 16], [0, 0, 0, 16, 16], [1, 5, 0, 16, 16],
                                        [2, 5, 0, 16, 16], [1, 5, 39, 16, 16], [1, 5, 10, 16, 16]]))[:, 0].numpy()
    r0, r1, c0, c1 = _extent(x[0])
    assert r1 - r0 + 1 == 20 and c1 - c0 + 1 == 20  # square 20 px at scale 1
    r0, r1, c0, c1 = _extent(x[1])
    assert r1 - r0 + 1 == 10  # scale 0.5
    r0, r1, c0, c1 = _extent(x[2])
    assert (c1 - c0 + 1) / (r1 - r0 + 1) == pytest.approx(2.0, rel=0.1)  # ellipse 2:1, long axis horizontal
    r0, r1, c0, c1 = _extent(x[3])
    assert c1 - c0 + 1 == pytest.approx(20, abs=1)  # heart 20 px wide
    assert x[3][r0 + 1].sum() < x[3][(r0 + r1) // 2].sum()  # two lobes on top, wider in the middle
    assert x[3][r1].sum() <= 2  # pointed bottom
    np.testing.assert_array_equal(x[2], x[4])  # orientation 2 pi == 0
    r0, r1, c0, c1 = _extent(x[5])  # 10 of 39 steps of 2 pi ~ 92 degrees: the ellipse stands upright
    assert (r1 - r0) > 1.5 * (c1 - c0)


def test_uniform_sampling_and_bad_factors():
    d = DSprites()
    f = d.sample_factors(20_000, np.random.default_rng(0))
    for k, size in enumerate(d.factor_sizes):
        counts = np.bincount(f[:, k], minlength=size)
        assert counts.min() > 0.7 * len(f) / size
    with pytest.raises(ValueError, match="out of range"):
        d.images_from_factors(np.array([[3, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        d.images_from_factors(np.zeros((2, 4), dtype=int))


def test_coloured_variant():
    f = added_factors()
    assert f.shape == (15_360, 6)
    assert len(np.unique(f, axis=0)) == 15_360
    assert (f[:, 1] == ADDED_SCALE_INDEX).all() and (f[:, 2] == ADDED_ORIENTATION_INDEX).all()
    assert set(f[:, 5].tolist()) == {1, 2, 3, 4, 5}
    c = ColouredDSprites()
    x = c.images_from_factors(f[:5])
    mask = DSprites().images_from_factors(f[:5, :5])
    assert x.shape == (5, 3, 64, 64)
    torch.testing.assert_close(x[:, 0:1], mask)  # red channel = the sprite for every level
    assert x[:, 1].amax(dim=(1, 2)).tolist() == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])  # white -> red
    white = colourise(mask[:1], np.array([0]))
    torch.testing.assert_close(white, WhiteDSprites().images_from_factors(f[:1, :5]))
