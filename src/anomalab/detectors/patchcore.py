"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Nothing is trained. An ImageNet backbone (here EfficientNet-Lite0; the paper used WideResNet-50) gives
mid-level feature maps of the normal images (paper: blocks 2 and 3, strides 8 and 16; here levels 4 and 5,
strides 8 and 16, 40 + 80 channels). Each map is aggregated over a p x p neighbourhood (3 x 3 average,
stride 1, zero-padded at the border: "locally aware patch features"), the coarser map is upsampled
bilinearly to the finer grid, the maps are concatenated and projected to d channels by adaptive average
pooling over the channels (paper: 1536 -> 1024; here 120 -> 64). All patch features of all training images
form the candidates; greedy k-centre selection on a Johnson-Lindenstrauss projection to d* = 128 dimensions
(skipped when d <= d*: the distances are then the features' own) keeps a fraction (`coreset_ratio`, 10 %)
of them as the memory bank M.

A test patch's score is the distance to its nearest bank vector; the image score s* is the largest patch
score (optionally re-weighted by the density around that nearest bank vector, the paper's eq. 7); the map
is the patch scores upsampled to the input size and smoothed by a Gaussian of sigma = 4 px.
Fitting streams the images in batches through the backbone and keeps only the candidate patch features.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalab import distributed
from anomalab.data.transforms import check_images, prepare
from anomalab.detector import BaseDetector
from anomalab.detectors._features import (
    build_backbone,
    check_levels,
    gaussian_blur,
    greedy_coreset,
    max_nearest_distance,
    nearest_neighbours,
    on_finest_grid,
    rank_batches,
)
from anomalab.errors import DataError, ParameterError
from anomalab.types import ImageSet


class PatchCore(BaseDetector):
    """score(images (N, C, H, W) in [0, 1]) -> (N,) largest patch distance to the memory bank (re-weighted
    with `reweight=True`); score_map -> (N, H, W) smoothed patch distances. Higher = more anomalous."""

    name = "patchcore"
    onnx_exportable = True
    distributable = True  # fit over ranks: all candidates gathered, one coreset over them (anomalab.distributed)
    _fitted_tensors = ("bank_",)
    _fitted_json = ("history_", "n_train_", "n_candidates_")

    def __init__(
        self,
        levels: tuple[int, ...] = (4, 5),  # backbone levels (paper: WRN-50 blocks 2 + 3, strides 8 and 16)
        image_size: int = 224,  # input side in pixels (the paper's 224)
        patch_size: int = 3,  # p: neighbourhood of the locally aware aggregation (average, stride 1)
        projection_dim: int | None = 64,  # d: channels after pooling the concatenation (paper 1024); None = all
        coreset_ratio: float = 0.1,  # |M| / |candidates| (paper: 10 % and 1 %)
        coreset_dims: int | None = 128,  # d*: Johnson-Lindenstrauss dimension of the coreset distances
        reweight: bool = False,  # image score re-weighted by the bank density (paper eq. 7)
        reweight_neighbours: int = 9,  # b: bank neighbours of m* in eq. 7
        sigma: float = 4.0,  # Gaussian smoothing of the map, pixels at image_size
        seed: int = 0,  # coreset start and projection
        backbone: str = "effnet_lite0",
        weights: str | None = "imagenet",  # "imagenet" = packaged weights, a local checkpoint path, or None
        batch_size: int = 4,  # images per backbone call (fit and score); small batches run faster on a CPU
        device: str = "cpu",
    ):
        self.levels = levels
        self.image_size = image_size
        self.patch_size = patch_size
        self.projection_dim = projection_dim
        self.coreset_ratio = coreset_ratio
        self.coreset_dims = coreset_dims
        self.reweight = reweight
        self.reweight_neighbours = reweight_neighbours
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
        if int(self.patch_size) < 1 or int(self.patch_size) % 2 == 0:
            raise ParameterError(f"{self.name}: patch_size must be an odd positive integer, got {self.patch_size!r}")
        if not 0 < float(self.coreset_ratio) <= 1:
            raise ParameterError(f"{self.name}: coreset_ratio must be in (0, 1], got {self.coreset_ratio!r}")
        for attr in ("projection_dim", "coreset_dims"):
            value = getattr(self, attr)
            if value is not None and int(value) < 1:
                raise ParameterError(f"{self.name}: {attr} must be a positive integer or None, got {value!r}")
        if int(self.reweight_neighbours) < 2:
            raise ParameterError(f"{self.name}: reweight_neighbours must be at least 2, got "
                                 f"{self.reweight_neighbours!r}")
        if float(self.sigma) < 0:
            raise ParameterError(f"{self.name}: sigma must be >= 0, got {self.sigma!r}")

    def _model_shape(self, data_shape=None) -> tuple[int, int, int]:
        if int(self.image_size) < 32:
            raise ParameterError(f"{self.name}: image_size must be at least 32 pixels, got {self.image_size}")
        return (3, int(self.image_size), int(self.image_size))

    def _build(self, shape) -> None:
        self.backbone_ = build_backbone(self.backbone, self.weights, int(self.seed), self.device_, self.name)

    def _after_load(self) -> None:
        self.bank_sq_ = (self.bank_ * self.bank_).sum(1)

    def _local_features(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Prepared images (B, 3, H, W) -> the chosen levels' features averaged over p x p neighbourhoods and
        concatenated on the finest level's grid, (B, h*w, C) before the channel pooling, and (h, w)."""
        levels = self.levels_
        feats = self.backbone_.features(x, levels)
        p = int(self.patch_size)
        maps = [F.avg_pool2d(feats[level], p, stride=1, padding=p // 2, count_include_pad=True)
                if p > 1 else feats[level] for level in levels]
        z = on_finest_grid(maps)
        h, w = z.shape[-2:]
        return z.flatten(2).transpose(1, 2), (h, w)

    def embed_patches(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Prepared images (B, 3, H, W) -> locally aware patch features (B, h*w, d) on the finest chosen
        level's grid, and (h, w)."""
        z, (h, w) = self._local_features(x)
        if self.projection_dim is not None and int(self.projection_dim) < z.shape[-1]:
            z = F.adaptive_avg_pool1d(z, int(self.projection_dim))  # pools the last (channel) axis
        return z.contiguous(), (h, w)

    # ---- fit ------------------------------------------------------------------------------------
    def fit(self, train: ImageSet | Tensor) -> PatchCore:
        """Fit on normal images: ImageSet or (N, C, H, W) tensor in [0, 1] (gray or RGB, any size)."""
        images = train.images if isinstance(train, ImageSet) else train
        images = check_images(images, what=f"{self.name}.fit")
        bs = int(self.batch_size)
        return self.fit_batches(images[i : i + bs] for i in range(0, len(images), bs))

    def fit_batches(self, batches: Iterable[Tensor]) -> PatchCore:
        """Fit from an iterable of (B, C, H, W) batches in [0, 1] (e.g. `anomalab.data.folder.iter_batches`);
        only the candidate patch features are kept, then reduced to the coreset."""
        self._check_params()
        shape = self._model_shape()
        self._build(shape)
        found: list[Tensor] = []
        n = 0
        group = distributed.active()  # inside anomalab.distributed.scope(): see the branch below

        def extract() -> None:
            nonlocal n
            with torch.inference_mode():
                for batch in rank_batches(batches, group, self.name):
                    z, _ = self.embed_patches(prepare(batch, shape).to(self.device_))
                    found.append(z.reshape(-1, z.shape[-1]))
                    n += len(batch)

        if group is not None:
            # each rank its batches; every rank's candidates gathered in the original order, so the pool is the
            # whole one of one process; the coreset is selected once, on rank 0, and its indices broadcast
            distributed.agree(extract, group)
            candidates = [c.to(self.device_) for c in distributed.gather_in_order(found, group)]
            counts = distributed.gather_in_order([torch.tensor([n])], group)
            n = int(sum(int(c) for c in counts))
        else:
            extract()
            candidates = found
        with torch.inference_mode():
            if n == 0:
                error = DataError(f"{self.name}.fit: no images to fit on")
                if group is None:
                    raise error
                distributed.raise_everywhere(error)
            pool = torch.cat(candidates)
            del candidates
            keep = math.ceil(float(self.coreset_ratio) * len(pool))
            if group is None:
                idx = greedy_coreset(pool, keep, seed=int(self.seed), dims=self.coreset_dims).to(pool.device)
            else:
                def select(rows: Tensor = pool) -> Tensor | None:
                    return greedy_coreset(rows, keep, seed=int(self.seed), dims=self.coreset_dims) \
                        if group.rank == 0 else None

                idx = distributed.broadcast_tensor(distributed.agree(select, group), group).to(pool.device)
            self.bank_ = pool[idx].contiguous()
        self.n_candidates_ = len(pool)
        del pool
        self._after_load()
        self.n_train_ = n
        self.history_ = []
        self.threshold_ = None
        self.input_shape_ = shape
        return self

    # ---- score ----------------------------------------------------------------------------------
    def _batched(self, fn, images: Tensor, batch_size: int | None) -> Tensor:
        return super()._batched(fn, images, batch_size or int(self.batch_size))

    def _patch_scores(self, x: Tensor) -> Tensor:
        """(B, h, w) distances of every patch to its nearest bank vector."""
        z, (h, w) = self.embed_patches(x)
        d, _ = nearest_neighbours(z.reshape(-1, z.shape[-1]), self.bank_, self.bank_sq_, with_index=False)
        return d.view(len(x), h, w)

    def _score_batch(self, x: Tensor) -> Tensor:
        z, _ = self.embed_patches(x)
        s_star, k = max_nearest_distance(z, self.bank_, self.bank_sq_)  # s* = max over patches of min over M
        if not self.reweight:
            return s_star
        m_test = z[torch.arange(len(x), device=z.device), k]  # m^test,*: the patch with the largest score
        m_star = self.bank_[nearest_neighbours(m_test, self.bank_, self.bank_sq_)[1]]  # m*: its nearest bank vector
        b = min(int(self.reweight_neighbours), len(self.bank_))
        d_bank = torch.addmm(self.bank_sq_[None], m_star, self.bank_.T, alpha=-2)
        neighbours = d_bank.topk(b, dim=1, largest=False).indices  # N_b(m*), m* itself included
        dist = (m_test[:, None] - self.bank_[neighbours]).norm(dim=-1)  # |m^test,* - m|, m in N_b(m*)
        # eq. 7: s = (1 - exp|m^test,* - m*| / sum_{m in N_b(m*)} exp|m^test,* - m|) s*, as a stable softmax
        weight = 1 - torch.exp(s_star - torch.logsumexp(dist, 1))
        return weight * s_star

    def _map_batch(self, x: Tensor) -> Tensor:
        d = self._patch_scores(x)
        maps = F.interpolate(d[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(maps, float(self.sigma))

    # ---- ONNX (anomalab.export) -----------------------------------------------------------------
    def _onnx_forward(self, x: Tensor, maps: bool, bank_chunk: int = 1024) -> tuple[Tensor, Tensor]:
        """Scores and maps as one fixed graph: the bank is a constant; every patch's distance to its nearest
        bank row is taken over blocks of `bank_chunk` rows with a running minimum (the same |a|^2 - 2 a.b + |b|^2
        products as `nearest_neighbours`, without `max_nearest_distance`'s data-dependent pruning, which gives
        the same largest distance); the channel pooling is a constant averaging matrix (the exporter cannot
        write adaptive pooling of a traced shape); the blur filters are built for the fitted image size."""
        z, (h, w) = self._local_features(x)
        d = sum(int(self.backbone_.level_channels[level - 1]) for level in self.levels_)
        if self.projection_dim is not None and int(self.projection_dim) < d:
            z = z @ _pool_matrix(d, int(self.projection_dim)).to(z)
            d = int(self.projection_dim)
        bank, bank_sq = self.bank_, self.bank_sq_
        q = z.reshape(-1, d)
        best = best_at = None
        for j in range(0, int(bank.shape[0]), bank_chunk):
            part = torch.addmm(bank_sq[None, j : j + bank_chunk], q, bank[j : j + bank_chunk].T, alpha=-2)
            if not self.reweight:
                v = part.amin(1)
                best = v if best is None else torch.minimum(best, v)
                continue
            v, k = part.min(1)
            if best is None:
                best, best_at = v, k
            else:
                better = v < best
                best, best_at = torch.where(better, v, best), torch.where(better, k + j, best_at)
        patch = (best + (q * q).sum(1)).clamp_min(0).sqrt().reshape(-1, h * w)  # (B, h*w)
        s_star, k = patch.max(1)
        scores = s_star
        if self.reweight:
            m_test = z.gather(1, k[:, None, None].expand(-1, 1, d))[:, 0]  # the patch with the largest score
            near = best_at.reshape(-1, h * w).gather(1, k[:, None])[:, 0]
            m_star = bank[near]
            b = min(int(self.reweight_neighbours), int(bank.shape[0]))
            d_bank = torch.addmm(bank_sq[None], m_star, bank.T, alpha=-2)
            neighbours = d_bank.topk(b, dim=1, largest=False).indices
            dist = (m_test[:, None] - bank[neighbours]).norm(dim=-1)
            scores = (1 - torch.exp(s_star - torch.logsumexp(dist, 1))) * s_star
        size = tuple(int(s) for s in self.input_shape_[1:])
        amap = F.interpolate(patch.reshape(-1, 1, h, w), size=size, mode="bilinear", align_corners=False)[:, 0]
        return scores, gaussian_blur(amap, float(self.sigma), size=size)


def _pool_matrix(channels: int, out: int) -> Tensor:
    """(channels, out) matrix M with z @ M = adaptive average pooling of z's last axis to `out` bins."""
    m = torch.zeros(channels, out)
    for i in range(out):
        start, end = (i * channels) // out, -(-((i + 1) * channels) // out)
        m[start:end, i] = 1.0 / (end - start)
    return m
