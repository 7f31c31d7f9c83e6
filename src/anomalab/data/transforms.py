"""The one place where images are checked, resized and converted between grayscale and RGB."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomalab.errors import DataError, ImageTypeError

# ITU-R BT.601 luma weights, the usual RGB -> gray conversion (as Pillow's "L" mode).
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def check_images(images: object, what: str = "images") -> Tensor:
    """Return `images` as a tensor, or raise a one-line DataError unless they are a finite (N, C, H, W)
    tensor (or array) in [0, 1] with 1 or 3 channels; ImageTypeError (a TypeError) for anything else."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor):
        raise ImageTypeError(f"{what}: expected a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise DataError(
            f"{what}: expected images of shape (N, C, H, W) in [0, 1], got {tuple(images.shape)}"
        )
    if images.shape[1] not in (1, 3):
        raise DataError(f"{what}: expected 1 (gray) or 3 (RGB) channels, got {images.shape[1]} "
                         f"in shape {tuple(images.shape)}")
    if images.numel():
        lo, hi = (float(v) for v in torch.aminmax(images))  # one pass; NaN propagates into lo/hi
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DataError(f"{what}: images contain NaN or infinite values")
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(f"{what}: expected values in [0, 1], got [{lo:.3g}, {hi:.3g}]")
    return images


def to_channels(images: Tensor, channels: int) -> Tensor:
    """Convert (N, C, H, W) between 1 and 3 channels (gray repeated; RGB by luma)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        return (images * _LUMA.to(images).view(1, 3, 1, 1)).sum(1, keepdim=True)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (antialiased when shrinking) of (N, C, H, W); a no-op at the same size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = images.shape[-2] > size[0] or images.shape[-1] > size[1]
    out = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrinking)
    return out.clamp_(0.0, 1.0)


def prepare(images: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Bring images to the (C, H, W) a model works at, as contiguous float32."""
    c, h, w = shape
    return resize(to_channels(images.float(), c), (h, w)).contiguous()


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) anomaly maps -> (N, H, W) by bilinear interpolation."""
    if tuple(maps.shape[-2:]) == tuple(size) or maps.numel() == 0:
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
