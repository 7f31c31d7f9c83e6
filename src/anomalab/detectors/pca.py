"""PCA baseline: score = reconstruction error from the first n principal components of the pixels."""

from __future__ import annotations

import torch
from sklearn.decomposition import PCA as SkPCA
from torch import Tensor

from anomalab.detector import BaseDetector
from anomalab.types import ImageSet


class PCA(BaseDetector):
    """score(images (N,C,H,W) in [0,1]) -> (N,) mean squared error between x and its projection on the
    principal subspace of the training pixels, higher = more anomalous; map = |x - x_hat|."""

    name = "pca"
    onnx_exportable = True
    _fitted_tensors = ("mean_", "components_")

    def __init__(self, n_components: int = 32, seed: int = 0, device: str = "cpu"):
        self.n_components = n_components  # number of principal components kept
        self.seed = seed  # randomised SVD seed
        self.device = device

    def _fit(self, x: Tensor, train: ImageSet) -> None:
        flat = x.flatten(1).double().numpy()
        n = min(self.n_components, flat.shape[0], flat.shape[1])
        if n < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")
        pca = SkPCA(n_components=n, random_state=self.seed).fit(flat)
        self.mean_ = torch.from_numpy(pca.mean_).float().to(self.device_)
        self.components_ = torch.from_numpy(pca.components_).float().contiguous().to(self.device_)

    def _reconstruct(self, x: Tensor) -> Tensor:
        centred = x.flatten(1) - self.mean_
        return (centred @ self.components_.T @ self.components_ + self.mean_).view_as(x)

    def reconstruct(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images -> projections on the principal subspace, at the model's shape."""
        return self._batched(self._reconstruct, images, batch_size)

    def _score_batch(self, x: Tensor) -> Tensor:
        return (x - self._reconstruct(x)).pow(2).flatten(1).mean(1)

    def _map_batch(self, x: Tensor) -> Tensor:
        return (x - self._reconstruct(x)).abs().mean(1)
