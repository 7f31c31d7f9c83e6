"""k-nearest-neighbour baseline: score = mean distance to the k nearest training images.

On raw pixels it is a strong baseline on MNIST-like data (it beats several GAN detectors); with
`embedder` pointing at a saved detector that can `embed`, it works on any learned embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from anomalab.detector import BaseDetector, read_meta
from anomalab.errors import LoadError, ParameterError
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
        self._load_embedder(LoadError)

    def _load_embedder(self, error: type[Exception] = ParameterError) -> None:
        """Load the `embedder` detector. A path that is not a saved detector is a one-line LoadError; one
        whose detector cannot embed is `error` (ParameterError at fit, LoadError when loading this knn).
        The saved kind is checked before its weights are read."""
        self._embedder = None
        if not self.embedder:
            return
        from anomalab.registry import REGISTRY, detector_class, load

        path = Path(self.embedder)
        folder = path / "detector" if (path / "detector").is_dir() else path
        try:
            kind = read_meta(folder)["name"]
            if kind not in REGISTRY:
                raise LoadError(f"{folder} holds an unknown detector '{kind}'")
        except LoadError as e:
            raise LoadError(f"knn embedder {self.embedder}: {e}") from None
        if not hasattr(detector_class(kind), "embed"):
            can = ", ".join(n for n in REGISTRY if hasattr(detector_class(n), "embed"))
            raise error(f"knn embedder {self.embedder}: a '{kind}' detector cannot embed images; "
                        f"use one that can ({can})")
        try:
            self._embedder = load(folder)
        except LoadError as e:
            raise LoadError(f"knn embedder {self.embedder}: {e}") from None

    def _fit(self, x: Tensor, train: ImageSet) -> None:
        if self.metric not in ("euclidean", "cosine"):
            raise ParameterError(f"metric must be 'euclidean' or 'cosine', got {self.metric!r}")
        if self.k < 1 or self.k > len(x):
            raise ParameterError(f"k must be in [1, {len(x)}] (the training set size), got {self.k}")
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

    # ---- ONNX (anomalab.export) -----------------------------------------------------------------
    @property
    def onnx_refusal(self) -> str | None:
        """Why this knn cannot be exported (None: it can)."""
        if self.embedder:
            return ("knn on an embedding cannot be exported to ONNX: the embedding detector's scoring is not part "
                    "of the graph; export a knn on pixels, or the embedding detector itself")
        return None

    def _onnx_forward(self, x: Tensor, maps: bool) -> tuple[Tensor, Tensor | None]:
        """The scoring as a fixed graph: the distances of `_neighbours`, with cdist's matrix-product form
        (|a|^2 - 2 a.b + |b|^2 as one product of augmented rows, as torch computes it) written out, because the
        exporter turns cdist into the difference form, whose (N, M, D) intermediate does not fit in memory."""
        f = self._features(x)
        if self.metric == "cosine":
            d = 1.0 - f @ self.train_features_.T
        else:
            t = self.train_features_
            f_sq, t_sq = f.pow(2).sum(-1, keepdim=True), t.pow(2).sum(-1, keepdim=True)
            a = torch.cat([f.mul(-2), f_sq, torch.ones_like(f_sq)], -1)
            b = torch.cat([t, torch.ones_like(t_sq), t_sq], -1)
            d = (a @ b.mT).clamp_min(0).sqrt()
        dist, idx = d.topk(self.k, dim=1, largest=False)
        scores = dist.clamp_min(0).mean(1)
        if not maps:
            return scores, None
        nearest = self.train_features_[idx].mean(1).view_as(x)
        return scores, (x - nearest).abs().mean(1)
