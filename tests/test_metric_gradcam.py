"""Grad-CAM of the metric detector (`Metric.score_map`) points at the defect, not just at the right shape.

A tiny anomaly-twin detector is trained on smooth, noisy sine gratings (128 px, scarred twins), then a
bright square is planted in a corner of fresh gratings. The map must put its mass in the square's
corner, follow the square when the same image gets it in the opposite corner, and put far less mass
there when the image is clean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalab.detectors.metric import Metric

SIZE, SQUARE, MARGIN = 128, 24, 2  # image side, square side, square's distance from the border


def gratings(n: int, rng: np.random.Generator) -> torch.Tensor:
    """n smooth textures (1, SIZE, SIZE): a sine grating of random direction, frequency and phase
    around 0.5 plus faint noise."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(n):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.15, 0.3), rng.uniform(0, 2 * np.pi)
        img = 0.5 + 0.15 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        out.append(np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1))
    return torch.from_numpy(np.stack(out).astype(np.float32))[:, None]


CORNERS = {0: (MARGIN, MARGIN), 1: (MARGIN, SIZE - SQUARE - MARGIN), 2: (SIZE - SQUARE - MARGIN, MARGIN),
           3: (SIZE - SQUARE - MARGIN, SIZE - SQUARE - MARGIN)}  # quadrant index: 2 * (bottom) + (right)


def plant(images: torch.Tensor, corners: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright (1.0) SQUARE x SQUARE square in the given corner of each image; returns images, masks."""
    out, masks = images.clone(), torch.zeros(len(images), SIZE, SIZE)
    for i, q in enumerate(corners):
        r, c = CORNERS[q]
        out[i, :, r : r + SQUARE, c : c + SQUARE] = 1.0
        masks[i, r : r + SQUARE, c : c + SQUARE] = 1.0
    return out, masks


def quadrant_mass(maps: torch.Tensor) -> torch.Tensor:
    """(N, 4) share of each map's total mass in its top-left, top-right, bottom-left, bottom-right quarter."""
    h = SIZE // 2
    q = torch.stack([maps[:, :h, :h], maps[:, :h, h:], maps[:, h:, :h], maps[:, h:, h:]], 1).sum((2, 3))
    return q / q.sum(1, keepdim=True).clamp_min(1e-12)


def share_in(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return (maps * masks).sum((1, 2)) / maps.sum((1, 2)).clamp_min(1e-12)


@pytest.fixture(scope="module")
def detector():
    # cam_level: the default (6), a 4 x 4 grid at 64 px input, so one CAM cell spans SIZE / 4 pixels.
    # Seeds 0-7 of this setting: the square's quarter is the map's heaviest in 8 of 8 images for 7 seeds
    # (6 of 8 for one), the square holds 4.6-7.7 times its area share of the map.
    det = Metric(head="softmax", mode="anomaly_twin", image_size=64, embedding_dim=16, train_blocks=1,
                 epochs=6, batch_size=16, lr=1e-3, seed=0)
    det.progress = False
    return det.fit(gratings(24, np.random.default_rng(0)))


def test_gradcam_peaks_on_a_planted_square(detector):
    clean = gratings(4, np.random.default_rng(1)).repeat_interleave(2, 0)  # each image twice ...
    corners = [0, 3, 3, 0, 1, 2, 2, 1]  # ... with the square in opposite corners
    bad, masks = plant(clean, corners)
    maps_bad, maps_clean = detector.score_map(bad), detector.score_map(clean)
    assert maps_bad.shape == (8, SIZE, SIZE) and (maps_bad >= 0).all() and torch.isfinite(maps_bad).all()

    # the map's heaviest quarter is the square's (and moves with it on the very same background)
    heaviest = quadrant_mass(maps_bad).argmax(1)
    assert (heaviest == torch.tensor(corners)).sum() >= 7, heaviest.tolist()
    assert (heaviest[0::2] != heaviest[1::2]).all()  # same image, square moved: the map moved too
    # the map's peak pixel lies on the square or within one CAM cell (SIZE / 4 px) of it
    cell = SIZE // 4
    near = torch.nn.functional.max_pool2d(masks[:, None], 2 * cell + 1, 1, cell)[:, 0]
    peaks = maps_bad.flatten(1).argmax(1)
    assert near.flatten(1)[torch.arange(8), peaks].float().mean() >= 0.75
    # the square covers 3.5 % of the image; it holds several times that share of the map
    area = float(masks[0].mean())
    assert float(share_in(maps_bad, masks).mean()) > 3 * area

    # negative control: the same places in the clean images get a much smaller share of their maps
    assert float(share_in(maps_clean, masks).mean()) < 0.6 * float(share_in(maps_bad, masks).mean())
    # ... and the square is what the score reacts to
    assert (detector.score(bad) > detector.score(clean)).all()
