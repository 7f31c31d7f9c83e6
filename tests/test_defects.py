import numpy as np
import pytest
import torch

from anomalab.generate.defects import DEFECTS, make_defect, random_defect, scar, scratch


def _image(c=1, h=64, w=64, value=0.5):
    return torch.full((c, h, w), value)


@pytest.mark.parametrize("name", list(DEFECTS))
@pytest.mark.parametrize("c", [1, 3])
def test_every_defect_changes_only_masked_pixels(name, c):
    rng = np.random.default_rng(0)
    img = torch.rand(c, 48, 40) * 0.4 + 0.3
    out, mask = DEFECTS[name](img, rng)
    assert isinstance(out, torch.Tensor) and out.shape == img.shape and out.dtype == torch.float32
    assert mask.shape == (48, 40) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum() > 0
    assert 0.0 <= out.min() and out.max() <= 1.0
    changed = (out - img).abs().amax(0) > 1e-6
    # outside the mask only a blob's soft rim (< 0.5 alpha) may change, within 2 px of the mask
    outside = changed & (mask == 0)
    if outside.any():
        dilated = torch.nn.functional.max_pool2d(mask[None, None], 5, 1, 2)[0, 0]
        assert (dilated[outside] > 0).all()
    assert changed[mask.bool()].float().mean() > 0.5
    assert torch.equal(img, img.clone())  # input untouched


def test_numpy_in_numpy_out_and_seeded():
    img = np.full((1, 32, 32), 0.5, dtype=np.float32)
    a, ma = scar(img, np.random.default_rng(3))
    b, mb = scar(img, np.random.default_rng(3))
    assert isinstance(a, np.ndarray) and np.array_equal(a, b) and np.array_equal(ma, mb)
    c, _ = scar(img, np.random.default_rng(4))
    assert not np.array_equal(a, c)
    assert (img == 0.5).all()


def test_scar_size_and_direction_follow_anomaly_twin():
    h = w = 224
    for seed in range(30):
        rng = np.random.default_rng(seed)
        _, mask = scar(_image(h=h, w=w), rng, min_contrast=0.3)
        ys, xs = np.nonzero(mask.numpy())
        extent = np.hypot(ys.max() - ys.min(), xs.max() - xs.min())
        assert extent <= 45 + 16 + 2  # length <= 45 plus the line's width
        if extent > 20:  # long enough to have a direction: from its outer end it runs toward the centre
            far = np.argmax(np.hypot(ys - 111.5, xs - 111.5))
            along = np.array([ys.mean() - ys[far], xs.mean() - xs[far]])
            inward = np.array([111.5 - ys[far], 111.5 - xs[far]])
            cos = along @ inward / (np.linalg.norm(along) * np.linalg.norm(inward))
            assert cos > 0.9


def test_scar_scales_with_image_size():
    areas = {}
    for size in (56, 224):
        total = 0.0
        for seed in range(20):
            _, m = scar(_image(h=size, w=size), np.random.default_rng(seed), min_contrast=0.3)
            total += float(m.sum()) / size**2
        areas[size] = total / 20
    assert areas[56] == pytest.approx(areas[224], rel=0.5)


def test_scratch_is_thin():
    _, m = scratch(_image(h=224, w=224), np.random.default_rng(1))
    ys, xs = np.nonzero(m.numpy())
    length = np.hypot(ys.max() - ys.min(), xs.max() - xs.min())
    assert m.sum() / max(length, 1) <= 4  # mean width <= 3 px (+ rounding)


def test_contrast_makes_defect_visible():
    img = _image(value=0.5)
    out, mask = make_defect("blob", img, np.random.default_rng(0), min_contrast=0.3, opacity=(1.0, 1.0))
    assert (out[:, mask.bool()] - 0.5).abs().mean() > 0.25


def test_random_defect_and_unknown_name():
    out, mask, name = random_defect(_image(), 5)
    assert name in DEFECTS and mask.sum() > 0
    with pytest.raises(KeyError, match="unknown defect"):
        make_defect("crack", _image(), 0)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        scar(torch.zeros(2, 1, 8, 8), 0)
