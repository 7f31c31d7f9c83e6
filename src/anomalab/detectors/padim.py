"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization", ICPR 2021).

Nothing is trained. The feature maps of three backbone levels (paper: ResNet-18 layers 1-3, strides 4, 8
and 16; here EfficientNet-Lite0 levels 3, 4 and 5, at the same strides: 24 + 40 + 80 = 144 channels) are
upsampled to the finest grid and concatenated; a fixed, seeded random subset of d channels is kept (paper:
100 of 448; here 100 of 144). Every grid position (i, j) gets a multivariate Gaussian
N(mu_ij, Sigma_ij) over the normal images, Sigma_ij = the sample covariance + eps I (eps = 0.01).

The map is the Mahalanobis distance sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij)) at every position,
upsampled bilinearly to the input size and smoothed by a Gaussian of sigma = 4 px; the image score is the
map's maximum. Fitting streams the images in batches and keeps only running sums (gaussian.py's `_Moments`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomalab import distributed
from anomalab.data.transforms import check_images, prepare, resize_maps
from anomalab.detector import BaseDetector
from anomalab.detectors._features import build_backbone, check_levels, gaussian_blur, on_finest_grid, rank_batches
from anomalab.detectors.gaussian import _Moments
from anomalab.errors import DataError, ParameterError
from anomalab.types import ImageSet

MOMENT_BATCH = 32  # images per update of the (P, d, d) sums: each update reads and writes all of them


def gaussian_precision(moments: _Moments, eps: float, chunk: int = 64) -> Tensor:
    """(P, d, d) float32 inverses of Sigma = the unbiased sample covariance + eps I, from the streamed sums
    of `moments` (float64, `chunk` positions at a time)."""
    n = moments.n
    out = torch.empty(moments.s2.shape, dtype=torch.float32)
    for i in range(0, len(out), chunk):
        s1, s2 = moments.s1[i : i + chunk], moments.s2[i : i + chunk]
        out[i : i + chunk] = ridge_inverse((s2 - s1[:, :, None] * s1[:, None, :] / n) / (n - 1), eps,
                                           f"padim.fit: a covariance is singular (n = {n} images, eps = {eps}): "
                                           "use eps > 0").float()
    return out


def ridge_inverse(cov: Tensor, eps: float, singular: str) -> Tensor:
    """(..., d, d) float64 inverses of cov + eps I by Cholesky; a DataError with the message `singular` when one
    is not positive definite."""
    chol, info = torch.linalg.cholesky_ex(cov + eps * torch.eye(cov.shape[-1], dtype=cov.dtype))
    if info.any():
        raise DataError(singular)
    return torch.cholesky_inverse(chol)


def mahalanobis(z: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """z (B, P, d), mean (P, d), precision (P, d, d) -> (B, P) distances, one batched product per position."""
    diff = (z.transpose(0, 1) - mean[:, None]).contiguous()  # (P, B, d); bmm is slow on strided input
    sq = (torch.bmm(diff, precision) * diff).sum(-1)
    return sq.clamp_min(0).sqrt().T


class PaDiM(BaseDetector):
    """score(images (N, C, H, W) in [0, 1]) -> (N,) maximum of the map; score_map -> (N, H, W) smoothed
    per-position Mahalanobis distances. Higher = more anomalous."""

    name = "padim"
    onnx_exportable = True
    distributable = True  # fit over ranks: the moment sums all-reduced (anomalab.distributed)
    _fitted_tensors = ("channels_", "mean_", "precision_")
    _fitted_json = ("history_", "n_train_", "grid_")

    def __init__(
        self,
        levels: tuple[int, ...] = (3, 4, 5),  # backbone levels (paper: ResNet-18 layers 1-3, strides 4, 8, 16)
        image_size: int = 224,  # input side in pixels (the paper's 224)
        d_channels: int = 100,  # d: random channels kept of the concatenation (paper: 100 of 448)
        eps: float = 0.01,  # epsilon of Sigma_ij + eps I
        sigma: float = 4.0,  # Gaussian smoothing of the map, pixels at image_size
        seed: int = 0,  # the random channel subset
        backbone: str = "effnet_lite0",
        weights: str | None = "imagenet",  # "imagenet" = packaged weights, a local checkpoint path, or None
        batch_size: int = 4,  # images per backbone call (fit and score); small batches run faster on a CPU
        device: str = "cpu",
    ):
        self.levels = levels
        self.image_size = image_size
        self.d_channels = d_channels
        self.eps = eps
        self.sigma = sigma
        self.seed = seed
        self.backbone = backbone
        self.weights = weights
        self.batch_size = batch_size
        self.device = device

    # ---- parameters and parts -------------------------------------------------------------------
    @property
    def levels_(self) -> tuple[int, ...]:
        return check_levels(self.levels, self.name)

    def _check_params(self) -> None:
        _ = self.levels_
        if int(self.d_channels) < 1:
            raise ParameterError(f"{self.name}: d_channels must be a positive integer, got {self.d_channels!r}")
        if float(self.eps) < 0 or float(self.sigma) < 0:
            raise ParameterError(f"{self.name}: eps and sigma must be >= 0, got {self.eps!r}, {self.sigma!r}")

    def _model_shape(self, data_shape=None) -> tuple[int, int, int]:
        if int(self.image_size) < 32:
            raise ParameterError(f"{self.name}: image_size must be at least 32 pixels, got {self.image_size}")
        return (3, int(self.image_size), int(self.image_size))

    def _build(self, shape) -> None:
        self.backbone_ = build_backbone(self.backbone, self.weights, int(self.seed), self.device_, self.name)

    def _choose_channels(self) -> Tensor:
        """The seeded random subset (sorted) of the concatenated channels: d of sum C_l."""
        total = sum(self.backbone_.level_channels[level - 1] for level in self.levels_)
        g = torch.Generator().manual_seed(int(self.seed))
        return torch.randperm(total, generator=g)[: min(int(self.d_channels), total)].sort().values

    def embed_patches(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Prepared images (B, 3, H, W) -> (B, h*w, d): the chosen channels of the concatenated levels on the
        finest level's grid, and (h, w)."""
        feats = self.backbone_.features(x, self.levels_)
        z = on_finest_grid([feats[level] for level in self.levels_])
        z = z.index_select(1, self.channels_.to(z.device))
        return z.flatten(2).transpose(1, 2), tuple(z.shape[-2:])

    # ---- fit ------------------------------------------------------------------------------------
    def fit(self, train: ImageSet | Tensor) -> PaDiM:
        """Fit on normal images: ImageSet or (N, C, H, W) tensor in [0, 1] (gray or RGB, any size)."""
        images = train.images if isinstance(train, ImageSet) else train
        images = check_images(images, what=f"{self.name}.fit")
        bs = int(self.batch_size)
        return self.fit_batches(images[i : i + bs] for i in range(0, len(images), bs))

    def fit_batches(self, batches: Iterable[Tensor]) -> PaDiM:
        """Fit from an iterable of (B, C, H, W) batches in [0, 1]; only running sums are kept."""
        self._check_params()
        shape = self._model_shape()
        self._build(shape)
        self.channels_ = self._choose_channels()
        moments = _Moments(lw=False)
        grid = None
        group = distributed.active()  # inside anomalab.distributed.scope(): each rank its batches, sums all-reduced

        def extract() -> None:
            nonlocal grid
            pending: list[Tensor] = []  # features of up to MOMENT_BATCH images, added to the sums in one product
            with torch.inference_mode():
                for batch in rank_batches(batches, group, self.name):
                    z, grid = self.embed_patches(prepare(batch, shape).to(self.device_))
                    pending.append(z.cpu())
                    if sum(len(p) for p in pending) >= MOMENT_BATCH:
                        moments.update(torch.cat(pending))
                        pending.clear()
                if pending:
                    moments.update(torch.cat(pending))

        if group is None:
            extract()
        else:
            distributed.agree(extract, group)
            distributed.all_reduce_moments(moments, group)
            grid = self._grid(shape)
        if moments.n == 0 or moments.n < 2:
            error = DataError(f"{self.name}.fit: no images to fit on" if moments.n == 0 else
                              f"{self.name}.fit: a covariance needs at least 2 normal images, got {moments.n}")
            if group is None:
                raise error
            distributed.raise_everywhere(error)
        self.mean_ = (moments.s1 / moments.n).float().to(self.device_)
        self.precision_ = gaussian_precision(moments, float(self.eps)).to(self.device_)
        self.grid_ = list(grid)
        self.n_train_ = moments.n
        self.history_ = []
        self.threshold_ = None
        self.input_shape_ = shape
        return self

    def _grid(self, shape) -> tuple[int, int]:
        """(h, w) of the finest chosen level for a prepared input of `shape` (one blank image through the net)."""
        with torch.inference_mode():
            return self.embed_patches(torch.zeros((1, *shape), device=self.device_))[1]

    # ---- score ----------------------------------------------------------------------------------
    def _batched(self, fn, images: Tensor, batch_size: int | None) -> Tensor:
        # 4 backbone batches per Mahalanobis product: the (P, d, d) precisions are read once per call
        return super()._batched(fn, images, batch_size or 4 * int(self.batch_size))

    def _embed_all(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        bs = int(self.batch_size)
        parts = [self.embed_patches(x[i : i + bs]) for i in range(0, len(x), bs)]
        return torch.cat([part[0] for part in parts]), parts[0][1]

    def _maps_from(self, d: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """(B, P) per-position distances -> (B, H, W) smoothed maps at the prepared size `size` (plain integers;
        batch-size free reshape and blur filters built for `size`, so the ONNX graph holds them as constants)."""
        maps = F.interpolate(d.reshape(-1, 1, *grid), size=size, mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(maps, float(self.sigma), size=size)

    def _map_batch(self, x: Tensor) -> Tensor:
        z, grid = self._embed_all(x)
        return self._maps_from(mahalanobis(z, self.mean_, self.precision_), grid, tuple(int(s) for s in x.shape[-2:]))

    # ---- calibration without refitting ------------------------------------------------------------
    def heldout_maps(self, images: Tensor, groups=None, chunk: int = 64) -> tuple[Tensor, Tensor]:
        """Leave-one-out scores (N,) and maps (N, H, W, input resolution) of the training images `images` (the
        ones this model was fitted on): each image as the PaDiM fitted on every training image outside its group
        would score it (`groups`: a group id per image, e.g. near-duplicates left out together; None = each image
        alone). Used for the threshold (`anomalab.thresholds.leave_group_out`): with d = 100 channels per position
        and a hundred images, a model fitted on 4/5 of them scores unseen images far higher than the full model
        does (measured on the grass textures: the 5-fold out-of-fold scores' median was 2.1x the test images'),
        while leaving one image out keeps the full model's sample size.

        Closed form, no refit: leaving out the m images of a group G, with u_j = x_j - mu (full-data mean) and
        S the full scatter matrix, the rest's covariance is Sigma'' = (S - U U^T - s s^T / (n - m)) / (n - m - 1)
        (s = sum of the u_j), i.e. Sigma'' + eps I = B - W W^T with B = S / (n - m - 1) + eps I and
        W = U L / sqrt(n - m - 1), L L^T = I + 1 1^T / (n - m); the held-out mean is mu'' = mu - s / (n - m).
        Woodbury's identity then gives v^T (B - W W^T)^-1 v = v^T B^-1 v + t^T (I - W^T B^-1 W)^-1 t with
        t = W^T B^-1 v: one Cholesky of B per position (as the fit) and an m x m solve per group. float64
        throughout; tested against explicit refits."""
        self._check_fitted()
        images = check_images(images, what=f"{self.name}.heldout_maps")
        n = len(images)
        groups = np.arange(n) if groups is None else np.asarray(groups)
        if groups.shape != (n,):
            raise ParameterError(f"{self.name}.heldout_maps: one group id per image, got {groups.shape} for {n}")
        if n != int(self.n_train_):
            raise ParameterError(f"{self.name}.heldout_maps: the model was fitted on {self.n_train_} images, "
                                 f"got {n}: leave-one-out scores need exactly the training images")
        ids, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
        if n - sizes.max() < 2:
            raise ParameterError(f"{self.name}.heldout_maps: leaving out a group of {sizes.max()} of {n} images "
                                 "leaves fewer than 2 to fit on")
        with torch.inference_mode():
            parts = [self._embed_all(prepare(images[i : i + 16], self.input_shape_).to(self.device_))
                     for i in range(0, n, 16)]
            z, grid = torch.cat([p[0] for p in parts]).cpu(), parts[0][1]
            mean = z.double().mean(0)  # (P, d)
            if not torch.allclose(mean.float(), self.mean_.cpu(), rtol=1e-4, atol=1e-4):
                raise ParameterError(f"{self.name}.heldout_maps: these are not the images the model was fitted on "
                                     "(their feature mean differs from the model's)")
            eps = float(self.eps)
            sq = torch.empty(n, z.shape[1], dtype=torch.float64)
            members = [np.flatnonzero(inverse == g) for g in range(len(ids))]
            singles = np.concatenate([m for m in members if len(m) == 1] or [np.empty(0, int)])
            multi = [m for m in members if len(m) > 1]
            group_sizes = sorted({len(m) for m in members})  # the sizes left out, each with its own B
            for lo in range(0, z.shape[1], chunk):
                u = z[:, lo : lo + chunk].double() - mean[lo : lo + chunk]  # (N, c, d)
                ut = u.transpose(0, 1)  # (c, N, d)
                scatter = ut.transpose(1, 2) @ ut  # (c, d, d)
                b_inv = {m: ridge_inverse(scatter / (n - m - 1), eps, f"{self.name}.heldout_maps: a covariance is "
                                          f"singular (eps = {eps}): use eps > 0") for m in group_sizes}  # B^-1 per m
                if len(singles):  # m = 1: W W^T = b u u^T, v = u n / (n - 1), a scalar Woodbury term
                    us = ut[:, torch.as_tensor(singles)]  # (c, k, d)
                    q = ((us @ b_inv[1]) * us).sum(-1)  # (c, k)
                    b = n / ((n - 1) * (n - 2))
                    sq[torch.as_tensor(singles), lo : lo + chunk] = ((n / (n - 1)) ** 2 * q / (1 - b * q)).T
                for idx in multi:
                    m = len(idx)
                    ug = ut[:, torch.as_tensor(idx)]  # (c, m, d), rows u_j
                    s = ug.sum(1, keepdim=True)  # (c, 1, d)
                    ell = torch.linalg.cholesky(torch.eye(m, dtype=torch.float64) + 1.0 / (n - m))
                    w = (ell.T @ ug) / math.sqrt(n - m - 1)  # (c, m, d), rows of W^T
                    v = ug + s / (n - m)  # (c, m, d), rows v_i = x_i - mu''
                    bi = b_inv[m]
                    bw, bv = w @ bi, v @ bi  # rows of (B^-1 W)^T and (B^-1 v)^T
                    cap = torch.eye(m, dtype=torch.float64) - bw @ w.transpose(1, 2)  # I - W^T B^-1 W
                    t = w @ bv.transpose(1, 2)  # (c, m, m): column i = W^T B^-1 v_i
                    sq[torch.as_tensor(idx), lo : lo + chunk] = (
                        (bv * v).sum(-1) + (t * torch.linalg.solve(cap, t)).sum(1)).T
            d = sq.clamp_min(0).sqrt().float()
            size = tuple(int(s) for s in self.input_shape_[1:])
            maps = torch.cat([self._maps_from(d[i : i + 64], grid, size) for i in range(0, n, 64)])
            scores = maps.flatten(1).amax(1)
        return scores, resize_maps(maps, tuple(images.shape[-2:]))

    def _score_batch(self, x: Tensor) -> Tensor:
        return self._map_batch(x).flatten(1).amax(1)

    def _onnx_forward(self, x: Tensor, maps: bool) -> tuple[Tensor, Tensor]:
        """Scores and maps as one fixed graph (anomalab.export): the map once, the score its maximum; batch-size
        free reshapes and blur filters built for the fitted image size (constants of the graph)."""
        z, grid = self.embed_patches(x)
        size = tuple(int(s) for s in self.input_shape_[1:])
        amap = self._maps_from(mahalanobis(z, self.mean_, self.precision_), grid, size)
        return amap.flatten(1).amax(1), amap
