"""k-nearest-neighbour baseline: score = mean distance to the k nearest training images.

On raw pixels it is a strong baseline on MNIST-like data (it beats several GAN detectors); with
`embedder` pointing at a saved detector that can `embed`, it works on any learned embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anomalab.detector import BaseDetector
from anomalab.types import ImageSet


class KNN(BaseDetector):
    """score(images (N,C,H,W) in [0,1]) -> (N,) mean Euclidean (or cosine) distance to the k nearest
    training images (flattened pixels or embeddings), higher = more anomalous. Pixel mode also gives
    a map: |x - mean of its k nearest training images|."""

    name = "knn"
    onnx_exportable = True
    _fitted_tensors = ("train_features_",)
    score_batch_size = 512

    def __init__(self, k: int = 5, metric: str = "euclidean", embedder: str | None = None,
                 device: str = "cpu"):
        self.k = k  # number of neighbours averaged
        self.metric = metric  # "euclidean" or "cosine" (cosine distance = 1 - cosine similarity)
        self.embedder = embedder  # folder of a saved detector with `embed`, or None for raw pixels
        self.device = device

    def _features(self, x: Tensor) -> Tensor:
        f = self._embedder.embed(x) if self.embedder else x.flatten(1)
        f = f.to(self.device_).float()
        return torch.nn.functional.normalize(f, dim=1) if self.metric == "cosine" else f

    def _after_load(self) -> None:
        self._load_embedder()

    def _load_embedder(self) -> None:
        self._embedder = None
        if self.embedder:
            from anomalab.registry import load

            self._embedder = load(self.embedder)
            if not hasattr(self._embedder, "embed"):
                raise ValueError(f"the detector in {self.embedder} cannot embed images")

    def _fit(self, x: Tensor, train: ImageSet) -> None:
        if self.metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine', got {self.metric!r}")
        if self.k < 1 or self.k > len(x):
            raise ValueError(f"k must be in [1, {len(x)}] (the training set size), got {self.k}")
        self._load_embedder()
        self.train_features_ = torch.cat([self._features(x[i : i + 1024]) for i in range(0, len(x), 1024)])

    def _neighbours(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self._features(x)
        if self.metric == "cosine":
            d = 1.0 - f @ self.train_features_.T
        else:
            d = torch.cdist(f, self.train_features_, compute_mode="use_mm_for_euclid_dist")
        return d.topk(self.k, dim=1, largest=False)

    def _score_batch(self, x: Tensor) -> Tensor:
        return self._neighbours(x)[0].clamp_min(0).mean(1)

    def _map_batch(self, x: Tensor) -> Tensor:
        if self.embedder:
            raise NotImplementedError("knn on an embedding has no anomaly map (score_map); use pixels")
        idx = self._neighbours(x)[1]
        nearest = self.train_features_[idx].mean(1).view_as(x)
        return (x - nearest).abs().mean(1)
