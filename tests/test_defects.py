import numpy as np
import pytest
import torch

from anomalab.generate.defects import DEFECTS, TEST_DEFECTS, make_defect, random_defect, scar, scratch


def _image(c=1, h=64, w=64, value=0.5):
    return torch.full((c, h, w), value)


@pytest.mark.parametrize("name", list(DEFECTS))
@pytest.mark.parametrize("c", [1, 3])
def test_every_defect_changes_only_masked_pixels(name, c):
    rng = np.random.default_rng(0)
    img = torch.rand(c, 48, 40, generator=torch.Generator().manual_seed(c)) * 0.4 + 0.3
    before = img.clone()
    out, mask = DEFECTS[name](img, rng)
    assert torch.equal(img, before)  # the input is never modified in place
    assert out.data_ptr() != img.data_ptr()
    assert isinstance(out, torch.Tensor) and out.shape == img.shape and out.dtype == torch.float32
    assert mask.shape == (48, 40) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum() > 0
    assert 0.0 <= out.min() and out.max() <= 1.0
    changed = (out - img).abs().amax(0) > 1e-6
    # outside the mask only a blob's soft rim (< 0.5 alpha) may change, within 2 px of the mask
    outside = changed & (mask == 0)
    if name in ("blob", "intensity_shift"):  # only a soft rim (< 0.5 alpha) may change, within 2 px
        dilated = torch.nn.functional.max_pool2d(mask[None, None], 5, 1, 2)[0, 0]
        assert (dilated[outside] > 0).all()
    else:  # hard-edged defects: not one pixel outside the mask changes
        assert not outside.any()
    assert changed[mask.bool()].float().mean() > 0.5


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
    img = _texture(c=1)
    out, mask, name = random_defect(img, 5)
    # recomputed by hand: one uniform draw of the name from the same stream, then that generator
    rng = np.random.default_rng(5)
    expected_name = TEST_DEFECTS[int(rng.integers(len(TEST_DEFECTS)))]
    expected, expected_mask = DEFECTS[expected_name](img, rng)
    assert name == expected_name and torch.equal(out, expected) and torch.equal(mask, expected_mask)
    names = {random_defect(img, seed)[2] for seed in range(40)}
    assert names == set(TEST_DEFECTS)  # every test defect is drawn, and the training-only scar never
    with pytest.raises(KeyError, match="unknown defect"):
        make_defect("crack", _image(), 0)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        scar(torch.zeros(2, 1, 8, 8), 0)


def _texture(c=1, h=48, w=48, seed=0):
    """A smooth texture in [0.3, 0.7]: far enough from 0 and 1 that no defect below gets clipped."""
    return torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed)) * 0.4 + 0.3


def _core(mask, px=2):
    """The mask eroded by px pixels, with everything beyond the image border counting as outside."""
    outside = torch.nn.functional.pad(1 - mask[None, None], (px,) * 4, value=1.0)
    return torch.nn.functional.max_pool2d(outside, 2 * px + 1, 1)[0, 0] == 0


@pytest.mark.parametrize("name", list(DEFECTS))
def test_same_seed_same_defect_other_seed_another(name):
    img = _texture(c=3)
    a, ma = DEFECTS[name](img, np.random.default_rng(7))
    b, mb = DEFECTS[name](img, 7)  # an int seed is the same as default_rng(seed)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    c, mc = DEFECTS[name](img, np.random.default_rng(8))
    assert not torch.equal(mc, ma) and not torch.equal(c, a)


def test_blob_change_is_linear_in_its_opacity():
    """blob = (1 - a) * image + a * colour inside its alpha: with the same seed (same shape, same colour)
    the change at opacity 0.9 is exactly 3 times the change at opacity 0.3."""
    img = _texture(c=3)
    diff = {}
    for a in (0.3, 0.9):
        out, mask = make_defect("blob", img, np.random.default_rng(2), opacity=(a, a), radius=(100, 100))
        diff[a] = out - img
    torch.testing.assert_close(diff[0.9], 3 * diff[0.3], atol=1e-5, rtol=1e-4)
    assert diff[0.3].abs().sum() > 0
    # the colour is one per image: inside the blob's full-alpha core, out = 0.1 * image + 0.9 * colour
    core = _core(mask)
    assert core.sum() > 10
    colour = (img + diff[0.9] - 0.1 * img)[:, core] / 0.9
    assert (colour.std(1) < 1e-5).all()


def test_intensity_shift_adds_a_constant_and_keeps_the_texture():
    """Inside the blob's core every pixel moves by the same +-shift, so the texture's pixel-to-pixel
    differences survive; the change scales with `shift`."""
    img = _texture(c=1)
    out = {}
    for s in (0.1, 0.2):
        out[s], mask = make_defect("intensity_shift", img, np.random.default_rng(4), shift=(s, s),
                                     radius=(100, 100))
    core = _core(mask)
    assert core.sum() > 10
    for s in (0.1, 0.2):
        inside = (out[s] - img)[:, core]
        torch.testing.assert_close(inside.abs(), torch.full_like(inside, s), atol=1e-6, rtol=0)
        assert inside.std() < 1e-6  # one sign, one value: the texture is only shifted
    torch.testing.assert_close(out[0.2] - img, 2 * (out[0.1] - img), atol=1e-5, rtol=1e-4)


def test_missing_patch_is_a_filled_rectangle_at_the_patch_mean():
    img = _texture(c=3, h=64, w=64)
    out, mask = make_defect("missing_patch", img, np.random.default_rng(5), noise=0.0)
    ys, xs = np.nonzero(mask.numpy())
    assert mask.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a full rectangle
    box = mask.bool()
    expected = img[:, box].mean(1, keepdim=True)  # brightness kept, structure gone
    torch.testing.assert_close(out[:, box], expected.expand(-1, int(box.sum())), atol=1e-6, rtol=0)
    assert img[:, box].std() > 0.05  # the texture that was there had structure
    noisy, _ = make_defect("missing_patch", img, np.random.default_rng(5), noise=0.02)
    assert 0.01 < float((noisy - out)[:, box].std()) < 0.03  # the faint noise has the asked std


def test_scar_is_one_colour_that_keeps_the_asked_contrast():
    img = _texture(c=3, h=64, w=64)
    for seed in range(10):
        out, mask = scar(img, np.random.default_rng(seed), min_contrast=0.3, width=(8, 16), length=(40, 45))
        box = mask.bool()
        colour = out[:, box]
        assert (colour.std(1) < 1e-6).all()  # every scar pixel has the same colour
        assert abs(float(colour.mean()) - float(img[:, box].mean())) >= 0.3 - 1e-6
