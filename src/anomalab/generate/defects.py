"""Synthetic defects with pixel masks: scar (AnomalyTwin), scratch, blob/stain, missing patch,
intensity/colour shift.

Every generator has the signature

    fn(image, rng, **options) -> (defective image, mask)

image: (C, H, W) float in [0, 1], a torch tensor or a numpy array (the output has the input's type);
rng: a `numpy.random.Generator` (or an int seed); mask: (H, W) float32 in {0, 1}, 1 = defective pixel.
Sizes are given at a 224-pixel reference and scaled by min(H, W) / 224, so a defect covers the same share
of the image at any resolution. The input is never modified.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

REFERENCE_SIZE = 224  # AnomalyTwin draws its scars on 224 x 224 images

DefectFn = Callable[..., tuple[object, object]]


def _as_array(image) -> tuple[np.ndarray, bool]:
    is_tensor = isinstance(image, torch.Tensor)
    arr = image.detach().cpu().numpy() if is_tensor else np.asarray(image)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"expected one image of shape (C, H, W) with C = 1 or 3, got {arr.shape}")
    return arr.astype(np.float32, copy=True), is_tensor


def _out(arr: np.ndarray, mask: np.ndarray, is_tensor: bool):
    arr = np.clip(arr, 0.0, 1.0).astype(np.float32)
    mask = mask.astype(np.float32)
    if is_tensor:
        return torch.from_numpy(arr), torch.from_numpy(mask)
    return arr, mask


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _scale(h: int, w: int) -> float:
    return min(h, w) / REFERENCE_SIZE


def _colour(rng: np.random.Generator, arr: np.ndarray, region: np.ndarray, min_contrast: float) -> np.ndarray:
    """A random colour (C,) in [0, 1]; with min_contrast > 0 its mean differs from the region's mean
    intensity by at least that much, so the defect stays visible on the texture."""
    c = arr.shape[0]
    local = float(arr[:, region].mean()) if region.any() else float(arr.mean())
    for _ in range(100):
        colour = rng.uniform(0.0, 1.0, size=c) if c == 3 else np.full(1, rng.uniform(0.0, 1.0))
        if abs(float(colour.mean()) - local) >= min_contrast:
            return colour.astype(np.float32)
    return np.full(c, 0.0 if local > 0.5 else 1.0, dtype=np.float32)


def _segment_mask(h: int, w: int, p0: np.ndarray, p1: np.ndarray, width: float) -> np.ndarray:
    """Pixels whose centre lies within width / 2 of the segment p0-p1 (points as (y, x))."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = p1 - p0
    length2 = float(d @ d)
    if length2 == 0:
        t = np.zeros_like(yy)
    else:
        t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / length2, 0.0, 1.0)
    dist2 = (yy - (p0[0] + t * d[0])) ** 2 + (xx - (p0[1] + t * d[1])) ** 2
    return dist2 <= max(width / 2.0, 0.5) ** 2


def scar(image, rng, width: tuple[float, float] = (1, 16), length: tuple[float, float] = (0, 45),
         min_contrast: float = 0.0):
    """AnomalyTwin's scar: a straight line from a random point pointing toward the image centre.

    width, length: ranges in pixels at 224 x 224 (AnomalyTwin: width 1-16, length up to 45 = 224 / 5),
    scaled with the image; the colour is uniform random (gray level for 1 channel). min_contrast
    (0 = AnomalyTwin) forces the colour away from the local mean intensity.
    """
    rng = _rng(rng)
    arr, is_tensor = _as_array(image)
    _, h, w = arr.shape
    s = _scale(h, w)
    line_width = max(1.0, rng.uniform(width[0], width[1]) * s)
    line_length = max(1.0, rng.uniform(length[0], length[1]) * s)
    start = np.array([rng.uniform(0, h - 1), rng.uniform(0, w - 1)], dtype=np.float32)
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0], dtype=np.float32)
    towards = centre - start
    norm = float(np.linalg.norm(towards))
    if norm < 1e-6:  # started at the centre: any direction points "toward" it
        angle = rng.uniform(0, 2 * np.pi)
        towards, norm = np.array([np.sin(angle), np.cos(angle)], dtype=np.float32), 1.0
    end = start + towards / norm * min(line_length, norm)
    mask = _segment_mask(h, w, start, end, line_width)
    arr[:, mask] = _colour(rng, arr, mask, min_contrast)[:, None]
    return _out(arr, mask, is_tensor)


def scratch(image, rng, width: tuple[float, float] = (1, 3), length: tuple[float, float] = (20, 90),
            min_contrast: float = 0.25):
    """A thin, longer scar (width 1-3 px, length 20-90 px at 224 px) that contrasts with the surface."""
    return scar(image, rng, width=width, length=length, min_contrast=min_contrast)


def _blob_mask(rng: np.random.Generator, h: int, w: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """An irregular blob: a radius modulated by a few random harmonics of the angle. Returns the
    binary mask and a soft alpha (1 inside, fading to 0 over ~2 px at the rim)."""
    cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    r = np.hypot(yy - cy, xx - cx)
    boundary = np.ones_like(theta)
    for k in (2, 3, 5):
        boundary += rng.uniform(0.0, 0.25) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    boundary *= radius / boundary.max()
    alpha = np.clip((boundary - r) / 2.0 + 0.5, 0.0, 1.0)
    return alpha >= 0.5, alpha


def blob(image, rng, radius: tuple[float, float] = (10, 28), opacity: tuple[float, float] = (0.5, 0.9),
         min_contrast: float = 0.2):
    """A stain: an irregular blob of a random colour blended over the surface (opacity = blend weight).
    radius in pixels at 224 px."""
    rng = _rng(rng)
    arr, is_tensor = _as_array(image)
    _, h, w = arr.shape
    rad = min(rng.uniform(*radius) * _scale(h, w), (min(h, w) - 1) / 2.0)
    mask, alpha = _blob_mask(rng, h, w, rad)
    colour = _colour(rng, arr, mask, min_contrast)
    a = rng.uniform(*opacity) * alpha
    arr = arr * (1 - a) + colour[:, None, None] * a
    return _out(arr, mask, is_tensor)


def missing_patch(image, rng, size: tuple[float, float] = (20, 50), noise: float = 0.02):
    """Missing material: a rectangle (side `size` px at 224 px) whose texture is gone, filled with the
    patch's mean colour plus faint noise, so the brightness stays and only the structure vanishes."""
    rng = _rng(rng)
    arr, is_tensor = _as_array(image)
    c, h, w = arr.shape
    s = _scale(h, w)
    ph = int(np.clip(round(rng.uniform(*size) * s), 2, h - 1))
    pw = int(np.clip(round(rng.uniform(*size) * s), 2, w - 1))
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    mask = np.zeros((h, w), dtype=bool)
    mask[y0 : y0 + ph, x0 : x0 + pw] = True
    mean = arr[:, mask].mean(axis=1)
    arr[:, mask] = mean[:, None] + rng.normal(0.0, noise, size=(c, int(mask.sum()))).astype(np.float32)
    return _out(arr, mask, is_tensor)


def intensity_shift(image, rng, radius: tuple[float, float] = (14, 36),
                    shift: tuple[float, float] = (0.15, 0.35)):
    """Discolouration: inside an irregular blob the intensity is shifted by +-`shift` (for RGB the shift
    differs per channel, so the hue changes too); the texture itself is kept."""
    rng = _rng(rng)
    arr, is_tensor = _as_array(image)
    c, h, w = arr.shape
    rad = min(rng.uniform(*radius) * _scale(h, w), (min(h, w) - 1) / 2.0)
    mask, alpha = _blob_mask(rng, h, w, rad)
    sign = rng.choice([-1.0, 1.0])
    mean_inside = float(arr[:, mask].mean()) if mask.any() else 0.5
    if (sign > 0 and mean_inside > 0.75) or (sign < 0 and mean_inside < 0.25):
        sign = -sign  # shift away from the nearer end of [0, 1] so clipping does not erase it
    delta = sign * rng.uniform(*shift, size=c).astype(np.float32)
    arr = arr + delta[:, None, None] * alpha
    return _out(arr, mask, is_tensor)


DEFECTS: dict[str, DefectFn] = {
    "scar": scar,
    "scratch": scratch,
    "blob": blob,
    "missing_patch": missing_patch,
    "intensity_shift": intensity_shift,
}


def make_defect(name: str, image, rng, **options):
    """Apply the generator named `name` (a key of DEFECTS) to one image."""
    if name not in DEFECTS:
        raise KeyError(f"unknown defect '{name}'; known: {', '.join(DEFECTS)}")
    return DEFECTS[name](image, rng, **options)


TEST_DEFECTS = ("scratch", "blob", "missing_patch", "intensity_shift")


def random_defect(image, rng, names: tuple[str, ...] = TEST_DEFECTS):
    """Apply one generator drawn uniformly from `names`; returns (image, mask, name)."""
    rng = _rng(rng)
    name = names[int(rng.integers(len(names)))]
    out, mask = DEFECTS[name](image, rng)
    return out, mask, name
