"""dSprites (Matthey et al. 2017), rendered procedurally from its factor grid (docs/beta_vaegan.md).

737,280 binary 64x64 images from five factors, in the published index order (posY fastest):

    shape        3   square, ellipse, heart
    scale        6   linspace(0.5, 1, 6)
    orientation 40   linspace(0, 2 pi, 40), both ends included (so the first and last look the same)
    posX        32   linspace(0, 1, 32); the column axis
    posY        32   linspace(0, 1, 32); the row axis (0 = top)

Geometry (our reading of the published images; no anti-aliasing, a pixel is on when its centre is inside):
sprite centres at pixel 16 + i for position index i (so they span the middle half of the canvas); a
square 20 px wide at scale 1; an ellipse 24 x 12 px (2:1) at scale 1; the heart's outline was never
published, so we draw the implicit two-lobed heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 (pointed bottom),
20 px wide at scale 1. Orientation turns the sprite counter-clockwise about its centre.

Images are never all held in memory: one 96x96 mask per (shape, scale, orientation) (720 masks, 6.6 MB)
is rendered once and each image is an integer-shifted 64x64 window of its mask.

The coloured variant (the "added" data of the beta-VAEGAN source, Akita & Taguchi): the 3,072 images with scale and
orientation fixed (3 shapes x 32 x 32 positions) recoloured to 5 levels from white to red, 15,360 RGB
images with label y = 1. Level t in {0.2, 0.4, 0.6, 0.8, 1.0} paints the sprite (1, 1 - t, 1 - t); pure
white (t = 0) is left out so that no added image equals an original one. `ColouredDSprites` extends
the grid with colour as a sixth factor (0 = white, 1..5 = the levels) for the disentanglement metric.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from anomalab.errors import ParameterError
from anomalab.types import ImageSet

SHAPES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
SCALES = np.linspace(0.5, 1.0, 6)
ORIENTATIONS = np.linspace(0.0, 2 * np.pi, 40)
POSITIONS = np.linspace(0.0, 1.0, 32)
IMAGE_SIZE = 64

SQUARE_SIDE_PX = 20.0  # at scale 1
ELLIPSE_AXES_PX = (24.0, 12.0)  # full length x width at scale 1 (2:1)
HEART_WIDTH_PX = 20.0  # at scale 1
FIRST_CENTRE_PX = 16  # centre of a sprite at position index 0; index i -> 16 + i

COLOUR_LEVELS = np.array([0.2, 0.4, 0.6, 0.8, 1.0])  # t: sprite colour (1, 1 - t, 1 - t), white -> red
ADDED_SCALE_INDEX = 5  # scale 1.0: the fixed scale of the added (coloured) data (our choice)
ADDED_ORIENTATION_INDEX = 0  # orientation 0: the fixed orientation of the added data (our choice)

_PAD = 16  # masks are 96x96: the 64x64 canvas plus 16 px on every side, sprite centred at 48
_MASK_SIZE = IMAGE_SIZE + 2 * _PAD


def _inside(shape: int, u: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Is the point (u, v) (pixels from the sprite centre, v up, already un-rotated) inside the shape?"""
    if shape == 0:
        half = SQUARE_SIDE_PX * scale / 2
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == 1:
        a, b = ELLIPSE_AXES_PX[0] * scale / 2, ELLIPSE_AXES_PX[1] * scale / 2
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    # heart: the implicit curve spans x in [-1.139, 1.139] and y in [-1, 1.236]; centre its bounding box
    unit = HEART_WIDTH_PX * scale / 2.278
    x, y = u / unit, v / unit + 0.118
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0.0


@lru_cache(maxsize=1)
def sprite_masks() -> np.ndarray:
    """(3, 6, 40, 96, 96) bool: every (shape, scale, orientation) sprite centred at (48, 48) of a 96x96
    frame; pixel (r, c) is on when its centre (r + 0.5, c + 0.5) is inside the sprite."""
    coords = np.arange(_MASK_SIZE) + 0.5 - _MASK_SIZE / 2
    dx = coords[None, :]  # column offset, right positive
    dy = -coords[:, None]  # row offset, up positive
    masks = np.zeros((*FACTOR_SIZES[:3], _MASK_SIZE, _MASK_SIZE), dtype=bool)
    for k, theta in enumerate(ORIENTATIONS):
        # rotating the sprite by +theta = testing the point rotated by -theta
        cos, sin = np.cos(theta), np.sin(theta)
        u = cos * dx + sin * dy
        v = -sin * dx + cos * dy
        for s in range(FACTOR_SIZES[0]):
            for j, scale in enumerate(SCALES):
                masks[s, j, k] = _inside(s, u, v, scale)
    masks.setflags(write=False)
    return masks


def _as_factors(factors: np.ndarray | Tensor | list, sizes: tuple[int, ...]) -> np.ndarray:
    f = np.asarray(factors, dtype=np.int64)
    if f.ndim == 1:
        f = f[None]
    if f.ndim != 2 or f.shape[1] != len(sizes):
        raise ValueError(f"expected factors of shape (N, {len(sizes)}), got {f.shape}")
    if (f < 0).any() or (f >= np.asarray(sizes)).any():
        raise ValueError(f"factor indices out of range; sizes are {sizes}")
    return f


def render_masks(factors: np.ndarray) -> np.ndarray:
    """(N, 5) factor indices -> (N, 64, 64) bool images (vectorised window gather from the masks)."""
    f = _as_factors(factors, FACTOR_SIZES)
    flat = sprite_masks().reshape(-1, _MASK_SIZE, _MASK_SIZE)
    mask_id = (f[:, 0] * FACTOR_SIZES[1] + f[:, 1]) * FACTOR_SIZES[2] + f[:, 2]
    # the window starting at 48 - centre puts the mask's centre (48) at the sprite's centre (16 + i)
    row0 = _MASK_SIZE // 2 - (FIRST_CENTRE_PX + f[:, 4])
    col0 = _MASK_SIZE // 2 - (FIRST_CENTRE_PX + f[:, 3])
    ar = np.arange(IMAGE_SIZE)
    rows = (row0[:, None] + ar)[:, :, None]
    cols = (col0[:, None] + ar)[:, None, :]
    return flat[mask_id[:, None, None], rows, cols]


class DSprites:
    """The dSprites grid: index <-> factors, uniform factor sampling, on-demand rendering.

    images_from_factors(factors (N, 5)) -> (N, 1, 64, 64) float32 in {0, 1}.
    """

    factor_names: tuple[str, ...] = FACTOR_NAMES
    factor_sizes: tuple[int, ...] = FACTOR_SIZES
    channels: int = 1

    def __len__(self) -> int:
        return int(np.prod(self.factor_sizes))

    @property
    def num_factors(self) -> int:
        return len(self.factor_sizes)

    def _strides(self) -> np.ndarray:
        sizes = np.asarray(self.factor_sizes)
        return np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]])

    def factors_from_index(self, index: np.ndarray | int) -> np.ndarray:
        """(N,) flat indices (last factor fastest) -> (N, K) factor indices."""
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if (idx < 0).any() or (idx >= len(self)).any():
            raise ValueError(f"image index out of range [0, {len(self)})")
        return (idx[:, None] // self._strides()) % np.asarray(self.factor_sizes)

    def index_from_factors(self, factors: np.ndarray) -> np.ndarray:
        """(N, K) factor indices -> (N,) flat indices."""
        return _as_factors(factors, self.factor_sizes) @ self._strides()

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n factor vectors, each factor uniform over its values: (n, K) int64."""
        return np.stack([rng.integers(0, s, size=n) for s in self.factor_sizes], axis=1)

    def images_from_factors(self, factors: np.ndarray) -> Tensor:
        return torch.from_numpy(render_masks(factors)).unsqueeze(1).float()

    def images(self, index: np.ndarray | int) -> Tensor:
        """Images at flat indices: (N, C, 64, 64) float32."""
        return self.images_from_factors(self.factors_from_index(index))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[Tensor, np.ndarray]:
        """n uniformly drawn images and their factors."""
        f = self.sample_factors(n, rng)
        return self.images_from_factors(f), f


def colourise(masks: Tensor, level: np.ndarray) -> Tensor:
    """(N, 1, H, W) binary masks, (N,) colour level (0 = white, 1..5 = COLOUR_LEVELS) -> (N, 3, H, W)."""
    t = np.concatenate([[0.0], COLOUR_LEVELS])[np.asarray(level, dtype=np.int64)]
    colour = torch.from_numpy(np.stack([np.ones_like(t), 1 - t, 1 - t], axis=1)).float()
    return masks * colour[:, :, None, None]


class ColouredDSprites(DSprites):
    """dSprites with colour as a sixth factor (0 = white, 1..5 = white -> red), RGB images.

    Used by the disentanglement metric over all six factors; colour on scales and orientations other
    than the added data's is rendered for evaluation only.
    """

    factor_names = (*FACTOR_NAMES, "colour")
    factor_sizes = (*FACTOR_SIZES, 1 + len(COLOUR_LEVELS))
    channels = 3

    def images_from_factors(self, factors: np.ndarray) -> Tensor:
        f = _as_factors(factors, self.factor_sizes)
        return colourise(super().images_from_factors(f[:, :5]), f[:, 5])


class WhiteDSprites(DSprites):
    """The original dSprites as RGB white sprites (how the original data enter the coloured model)."""

    channels = 3

    def images_from_factors(self, factors: np.ndarray) -> Tensor:
        return super().images_from_factors(factors).expand(-1, 3, -1, -1).contiguous()


ADDED_POSES = ("fixed", "all")


def added_factors(scale_index: int = ADDED_SCALE_INDEX,
                  orientation_index: int = ADDED_ORIENTATION_INDEX, poses: str = "fixed",
                  seed: int = 0) -> np.ndarray:
    """The 15,360 (shape, scale, orientation, posX, posY, colour) factor rows of the added data:
    3 shapes x 32 x 32 positions, each in the 5 colour levels 1..5. poses="fixed" (the source's data): every
    image at the given scale and orientation; "all": each of the 3,072 (shape, position) bases at its own
    scale and orientation drawn uniformly (seeded), the same in its five colour levels, so that colour is
    no longer tied to one pose."""
    if poses not in ADDED_POSES:
        raise ParameterError(f"poses must be 'fixed' or 'all', got {poses!r}")
    s, x, y, c = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), np.arange(1, 6), indexing="ij")
    n = s.size
    scale, orientation = np.full(n, scale_index), np.full(n, orientation_index)
    if poses == "all":
        rng = np.random.default_rng(seed)
        bases = n // 5  # meshgrid order: the colour level varies fastest
        scale = np.repeat(rng.integers(0, FACTOR_SIZES[1], size=bases), 5)
        orientation = np.repeat(rng.integers(0, FACTOR_SIZES[2], size=bases), 5)
    return np.stack([s.ravel(), scale, orientation, x.ravel(), y.ravel(), c.ravel()], axis=1).astype(np.int64)


def added_set(scale_index: int = ADDED_SCALE_INDEX, orientation_index: int = ADDED_ORIENTATION_INDEX,
              poses: str = "fixed") -> ImageSet:
    """The added ("anomalous") data as an ImageSet: 15,360 RGB images, labels y = 1, classes = colour level
    (poses: see `added_factors`)."""
    f = added_factors(scale_index, orientation_index, poses)
    return ImageSet(images=ColouredDSprites().images_from_factors(f), labels=np.ones(len(f), dtype=np.int64),
                    classes=f[:, 5], meta={"name": "dsprites_coloured", "class_names": ["white"] + [
                        f"red{t:.1f}" for t in COLOUR_LEVELS]})
