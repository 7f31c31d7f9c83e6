"""Gaussian anomaly detection on pretrained features (Rippel, Mertens & Merhof, "Modeling the
Distribution of Normal Data in Pre-Trained Deep Features for Anomaly Detection", ICPR 2020).

Nothing is trained. An ImageNet EfficientNet (here Lite0, the paper used B4) embeds the normal images;
the features of each level (stem, seven MBConv stages, head: levels 1-9) are global-average-pooled and
modelled by a multivariate Gaussian with a Ledoit-Wolf shrinkage covariance. Score = sum over the chosen
levels of the Mahalanobis distance sqrt((f - mu)^T Sigma^-1 (f - mu)).

Patch variant (our addition for localisation, in the spirit of PaDiM): the feature maps of `patch_levels`
(default: levels 4 and 5, strides 8 and 16) are brought to the finer grid and a Gaussian is fitted per
spatial position; the map is the per-position Mahalanobis distance, upsampled to the input size.
Features stream batch by batch: the fit keeps pooled vectors and running moments, never whole activations.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from sklearn.covariance import ledoit_wolf
from torch import Tensor

from anomalab import distributed
from anomalab.data.transforms import check_images, prepare
from anomalab.detector import BaseDetector
from anomalab.errors import DataError, ParameterError
from anomalab.nets.effnet_lite0 import LEVELS, make_backbone
from anomalab.progress import progress
from anomalab.types import ImageSet


def ledoit_wolf_from_moments(n: int, s1: Tensor, s2: Tensor, sa: Tensor, sa2: Tensor, sax: Tensor) -> Tensor:
    """Ledoit-Wolf covariance (as scikit-learn's `LedoitWolf`) from streamed sums over n samples x_k of
    dimension d, batched over leading dims: s1 = sum x, s2 = sum x x^T, sa = sum |x|^2, sa2 = sum |x|^4,
    sax = sum |x|^2 x. Returns (..., d, d) = (1 - s) S + s tr(S)/d I with the Ledoit-Wolf shrinkage s."""
    d = s1.shape[-1]
    m = s1 / n
    cov = s2 / n - m[..., :, None] * m[..., None, :]  # biased empirical covariance S
    c = (m * m).sum(-1)
    mt_s1 = (m * s1).sum(-1)
    # sum_k |x_k - m|^4, expanded so that only the streamed sums are needed
    sum_b2 = sa2 + 2 * c * sa + n * c * c
    sum_bt = (m * sax).sum(-1) + c * mt_s1
    sum_t2 = torch.einsum("...i,...ij,...j->...", m, s2, m)
    fourth = sum_b2 - 4 * sum_bt + 4 * sum_t2
    trace = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    mu = trace / d
    delta_ = (cov * cov).sum((-2, -1))
    beta = (fourth / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * trace + d * mu * mu) / d
    beta = torch.minimum(beta, delta)
    shrink = torch.where(beta == 0, torch.zeros_like(beta), beta / delta.clamp_min(1e-300))
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return (1 - shrink)[..., None, None] * cov + (shrink * mu)[..., None, None] * eye


class _Moments:
    """Running sums over (N, P, d) batches (P positions): sum x and sum x x^T (float64), and with lw=True also
    the sums `ledoit_wolf_from_moments` needs (PaDiM's plain covariance does without them)."""

    def __init__(self, lw: bool = True):
        self.n = 0
        self.lw = lw
        self.s1 = self.s2 = self.sa = self.sa2 = self.sax = None

    def update(self, x: Tensor) -> None:
        """Add a batch. Each call reads and writes all P d^2 sums, so larger batches cost less per image (PaDiM
        passes 32 images per call and keeps no Ledoit-Wolf sums: 2.6x less time per image than batches of 4 with
        them, measured on 3,136 positions x 100 channels)."""
        x = x.double()
        if self.s1 is None:
            p, d = x.shape[1:]
            self.s1, self.s2 = x.new_zeros(p, d), x.new_zeros(p, d, d)
            if self.lw:
                self.sa, self.sa2, self.sax = x.new_zeros(p), x.new_zeros(p), x.new_zeros(p, d)
        xt = x.transpose(0, 1)  # (P, N, d)
        self.s2.baddbmm_(xt.transpose(1, 2), xt)  # sum x x^T, accumulated in place (no (P, d, d) temporary)
        self.s1.add_(x.sum(0))
        if self.lw:
            a = (x * x).sum(-1)
            self.sa.add_(a.sum(0))
            self.sa2.add_((a * a).sum(0))
            self.sax.add_((a[..., None] * x).sum(0))
        self.n += len(x)

    def precision(self, chunk: int = 64) -> Tensor:
        """(P, d, d) float32 inverse Ledoit-Wolf covariances, computed `chunk` positions at a time so the
        float64 temporaries stay small."""
        out = torch.empty(self.s2.shape, dtype=torch.float32)
        for i in range(0, len(self.s2), chunk):
            sl = slice(i, i + chunk)
            cov = ledoit_wolf_from_moments(self.n, self.s1[sl], self.s2[sl], self.sa[sl], self.sa2[sl],
                                           self.sax[sl])
            out[sl] = torch.linalg.inv(cov).float()
        return out


def _mahalanobis(f: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """f (..., d), mean (..., d), precision (..., d, d) -> (...) sqrt((f - mean)^T P (f - mean))."""
    diff = f - mean
    return torch.einsum("...i,...ij,...j->...", diff, precision, diff).clamp_min(0).sqrt()


class Gaussian(BaseDetector):
    """score(images (N, C, H, W) in [0, 1]) -> (N,), sum of per-level Mahalanobis distances (the paper's;
    `image_score="map_max"`: the largest distance of the patch map); higher = more anomalous.
    score_map -> (N, H, W) per-position distances of the patch Gaussians."""

    name = "gaussian"
    onnx_exportable = True
    distributable = True  # fit over ranks: pooled features gathered, moment sums all-reduced (`_stream`)
    _fitted_tensors = ("means_", "precisions_", "patch_mean_", "patch_precision_")
    _fitted_json = ("history_", "n_train_")
    score_batch_size = 8  # see batch_size
    patch_mean_: Tensor | None = None
    patch_precision_: Tensor | None = None

    def __init__(
        self,
        levels: tuple[int, ...] | None = None,  # Rippel: feature levels summed (1 stem .. 9 head); None = all 9
        image_size: int = 224,  # input side in pixels (Lite0's native 224; B4 in the paper used 380)
        patch_levels: tuple[int, ...] | None = (4, 5),  # levels of the per-position Gaussians (maps); None = off
        backbone: str = "effnet_lite0",
        weights: str | None = "imagenet",  # "imagenet" = packaged weights, or a local checkpoint path
        batch_size: int = 8,  # small batches run faster on CPU: Lite0's depthwise convs are memory-bound
        image_score: str = "levels",  # "levels": the paper's sum over `levels`; "map_max": max of the patch map
        device: str = "cpu",
    ):
        self.levels = levels
        self.image_size = image_size
        self.patch_levels = patch_levels
        self.backbone = backbone
        self.weights = weights
        self.batch_size = batch_size
        self.image_score = image_score
        self.device = device

    # ---- shapes and parts -----------------------------------------------------------------------
    @property
    def levels_(self) -> tuple[int, ...]:
        levels = tuple(LEVELS if self.levels is None else sorted(int(v) for v in self.levels))
        if not levels or not set(levels) <= set(LEVELS):
            raise ParameterError(f"levels must be a non-empty subset of {LEVELS}, got {self.levels}")
        return levels

    def _model_shape(self, data_shape=None) -> tuple[int, int, int]:
        if int(self.image_size) < 32:
            raise ParameterError(f"image_size must be at least 32 pixels, got {self.image_size}")
        return (3, int(self.image_size), int(self.image_size))

    def _build(self, shape) -> None:
        self.backbone_ = make_backbone(self.backbone, self.weights).to(self.device_).eval()
        self.backbone_.requires_grad_(False)

    def _after_load(self) -> None:
        self._split_levels()

    def _split_levels(self) -> None:
        """Per-level views of the flat fitted tensors (saved flat so safetensors holds one tensor each)."""
        self.level_mean_, self.level_precision_ = {}, {}
        i = j = 0
        for level, c in zip(LEVELS, self.backbone_.level_channels):  # the backbone's widths (Lite2: wider)
            self.level_mean_[level] = self.means_[i : i + c]
            self.level_precision_[level] = self.precisions_[j : j + c * c].view(c, c)
            i, j = i + c, j + c * c

    def _patch_features(self, feats: dict[int, Tensor]) -> Tensor:
        """(N, C, h, w) maps of the patch levels -> (N, h*w, sum C) on the finest of their grids."""
        maps = [feats[level] for level in sorted(self.patch_levels)]
        h, w = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == (h, w) else
                F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in maps]
        return torch.cat(maps, 1).flatten(2).transpose(1, 2)

    def _features(self, x: Tensor) -> dict[int, Tensor]:
        wanted = set(LEVELS) | set(self.patch_levels or ())
        return self.backbone_.features(x, tuple(wanted))

    # ---- fit ------------------------------------------------------------------------------------
    def fit(self, train: ImageSet | Tensor) -> Gaussian:
        """Fit on normal images: ImageSet or (N, C, H, W) tensor in [0, 1] (gray or RGB, any size)."""
        images = train.images if isinstance(train, ImageSet) else train
        check_images(images, what=f"{self.name}.fit")
        bs = int(self.batch_size)
        return self.fit_batches([images[i : i + bs] for i in range(0, len(images), bs)])  # views, no copies

    def fit_batches(self, batches: Iterable[Tensor]) -> Gaussian:
        """Fit from an iterable of (B, C, H, W) batches in [0, 1], e.g. images read from files in chunks
        (`anomalab.data.folder.iter_batches`); only pooled features and running moments are kept."""
        _ = self.levels_  # validate before the work
        self._check_image_score()
        shape = self._model_shape()
        self._build(shape)
        pooled, moments = self._stream(batches, shape)
        n = sum(len(p) for p in pooled[1])
        if n == 0 or n < 2:
            error = DataError(f"{self.name}.fit: no images to fit on" if n == 0 else
                              f"{self.name}.fit needs at least 2 normal images, got {n}")
            if distributed.active() is None:
                raise error
            distributed.raise_everywhere(error)
        means, precisions = [], []
        for level in LEVELS:
            feats = torch.cat(pooled[level]).numpy()
            cov, _ = ledoit_wolf(feats)  # scikit-learn's shrinkage covariance (the estimate LedoitWolf fits)
            # inverse by Cholesky: the shrunk covariance is positive definite; ~30x faster than pinvh here
            precision = torch.cholesky_inverse(torch.linalg.cholesky(torch.from_numpy(cov)))
            means.append(torch.from_numpy(feats.mean(0)))
            precisions.append(precision.reshape(-1))
        self.means_ = torch.cat(means).to(self.device_)
        self.precisions_ = torch.cat(precisions).to(self.device_)
        self.patch_mean_ = self.patch_precision_ = None
        if moments is not None:
            self.patch_mean_ = (moments.s1 / moments.n).float().to(self.device_)
            self.patch_precision_ = moments.precision().to(self.device_)
        self._split_levels()
        self.n_train_ = n
        self.history_ = []
        self.threshold_ = None
        self.input_shape_ = shape
        return self

    def _stream(self, batches: Iterable[Tensor], shape) -> tuple[dict[int, list[Tensor]], _Moments | None]:
        """The pooled features of every level (per batch, in order) and the patch moments of `batches`. Inside
        `anomalab.distributed.scope()`, each rank extracts its batches; the pooled features are gathered back
        into the original order and the moment sums all-reduced, so every rank gets one process's values."""
        group = distributed.active()
        pooled: dict[int, list[Tensor]] = {level: [] for level in LEVELS}
        moments = _Moments() if self.patch_levels else None

        def extract() -> None:
            with torch.inference_mode():
                mine = batches if group is None else distributed.my_batches(batches, group)
                for batch in progress(mine, f"{self.name} features", unit="batch",
                                      enabled=getattr(self, "progress", True)):
                    check_images(batch, what=f"{self.name}.fit")
                    x = prepare(batch, shape).to(self.device_)
                    feats = self._features(x)
                    for level in LEVELS:
                        pooled[level].append(feats[level].mean((2, 3)).double().cpu())
                    if moments is not None:
                        moments.update(self._patch_features(feats).cpu())

        if group is None:
            extract()
            return pooled, moments
        distributed.agree(extract, group)
        widths = list(self.backbone_.level_channels)
        joined = [torch.cat([pooled[level][i] for level in LEVELS], 1) for i in range(len(pooled[1]))]
        joined = distributed.gather_in_order(joined, group)
        pooled = {level: [part.split(widths, 1)[j] for part in joined] for j, level in enumerate(LEVELS)}
        if moments is not None:
            distributed.all_reduce_moments(moments, group)
        return pooled, moments

    # ---- score ----------------------------------------------------------------------------------
    def _level_distances(self, x: Tensor) -> Tensor:
        feats = self._features(x)
        cols = [_mahalanobis(feats[level].mean((2, 3)).double(), self.level_mean_[level],
                             self.level_precision_[level]) for level in LEVELS]
        return torch.stack(cols, 1)

    def _check_image_score(self) -> None:
        if self.image_score not in ("levels", "map_max"):
            raise ParameterError(f"image_score must be 'levels' or 'map_max', got {self.image_score!r}")
        if self.image_score == "map_max" and self.patch_levels is None:
            raise ParameterError("image_score='map_max' needs the patch map: give patch_levels (e.g. (4, 5))")

    def _score_batch(self, x: Tensor) -> Tensor:
        self._check_image_score()
        if self.image_score == "map_max":  # the largest per-position distance: small defects count fully
            return self._map_batch(x).flatten(1).amax(1).double()
        idx = [LEVELS.index(level) for level in self.levels_]
        return self._level_distances(x)[:, idx].sum(1)

    def _map_batch(self, x: Tensor) -> Tensor:
        if self.patch_levels is None or self.patch_mean_ is None:
            raise NotImplementedError(f"{self.name} was fitted with patch_levels=None: no score_map")
        feats = self._features(x)
        h, w = feats[min(self.patch_levels)].shape[-2:]
        d = _mahalanobis(self._patch_features(feats), self.patch_mean_, self.patch_precision_)
        return d.view(len(x), h, w)

    def level_scores(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images (N, C, H, W) -> (N, 9) Mahalanobis distance of each level 1..9 alone (the paper's level
        study); `score` sums the columns of `levels`."""
        return self._batched(self._level_distances, images, batch_size)

    # ---- ONNX (anomalab.export) -----------------------------------------------------------------
    def _onnx_forward(self, x: Tensor, maps: bool) -> tuple[Tensor, Tensor | None]:
        """The scoring as a fixed graph: the distances of `_score_batch` and `_map_batch` written as matrix
        products (ONNX Runtime cannot infer shapes through their broadcast einsum), the score in float64 as
        in torch, batch-size free reshapes; the levels' features are computed once for both outputs."""
        feats = self._features(x)
        patch_map = None
        if maps or self.image_score == "map_max":
            h, w = feats[min(self.patch_levels)].shape[-2:]
            diff = (self._patch_features(feats).transpose(0, 1) - self.patch_mean_[:, None]).contiguous()  # (P,B,d)
            sq = (torch.bmm(diff, self.patch_precision_) * diff).sum(-1)
            patch_map = sq.clamp_min(0).sqrt().T.reshape(-1, h, w)
        if self.image_score == "map_max":
            scores = patch_map.flatten(1).amax(1).double()
        else:
            cols = []
            for level in self.levels_:
                diff = feats[level].mean((2, 3)).double() - self.level_mean_[level]
                cols.append(((diff @ self.level_precision_[level]) * diff).sum(-1).clamp_min(0).sqrt())
            scores = torch.stack(cols, 1).sum(1)
        return scores, patch_map if maps else None
