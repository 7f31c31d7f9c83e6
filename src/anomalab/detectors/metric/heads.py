"""Classification heads / losses of the metric-learning detector, all called as `head(embeddings, labels)
-> scalar loss` and `head.logits(embeddings) -> (N, K)` where a plain prediction makes sense.

softmax      linear classifier + cross-entropy (the plain CNN baseline)
l2_softmax   Ranjan et al. 2017: features L2-normalised and scaled to alpha before the classifier
arcface      Deng et al. 2019, additive angular margin m (pytorch-metric-learning takes DEGREES)
cosface      Wang et al. 2018, additive cosine margin m (cosine units)
sphereface   Liu et al. 2017, multiplicative angular margin m (an integer factor on the angle)
center       Wen et al. 2016: softmax + lambda * CenterLoss (pytorch-metric-learning has none)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml
from torch import Tensor, nn

HEADS = ("softmax", "l2_softmax", "arcface", "cosface", "sphereface", "center")

# AnomalyTwin reference settings (docs/detectors/metric.md)
ARCFACE_MARGIN_RAD = 0.5  # m, radians (converted to degrees for pytorch-metric-learning)
COSFACE_MARGIN = 0.4  # m, subtracted from the target cosine
SPHEREFACE_MARGIN = 4  # m, the target angle is multiplied by m
L2_SOFTMAX_ALPHA = 16.0  # alpha, norm of the features before the classifier
CENTER_WEIGHT = 1 / 8  # lambda, weight of the center loss beside the softmax loss
MARGIN_SCALE = 64.0  # s, logit scale of ArcFace and CosFace (both papers' default)


def center_loss(embeddings: Tensor, labels: Tensor, centers: Tensor) -> Tensor:
    """Wen et al. 2016, eq. 2, averaged over the batch: 1/2 mean_i ||x_i - c_{y_i}||^2."""
    return 0.5 * (embeddings - centers[labels]).pow(2).sum(1).mean()


class SoftmaxHead(nn.Module):
    """Linear classifier + cross-entropy; with `alpha` the L2-constrained softmax (features rescaled to
    norm alpha); with `center_weight` softmax + lambda * center loss (learned centers)."""

    def __init__(self, num_classes: int, embedding_dim: int, alpha: float | None = None,
                 center_weight: float | None = None):
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_classes)
        self.alpha = alpha
        self.center_weight = center_weight
        if center_weight is not None:
            self.centers = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)

    def logits(self, embeddings: Tensor) -> Tensor:
        if self.alpha is not None:
            embeddings = self.alpha * F.normalize(embeddings, dim=1)
        return self.fc(embeddings)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        loss = F.cross_entropy(self.logits(embeddings), labels)
        if self.center_weight is not None:
            loss = loss + self.center_weight * center_loss(embeddings, labels, self.centers)
        return loss


class MarginHead(nn.Module):
    """A pytorch-metric-learning large-margin loss (ArcFace, CosFace, SphereFace) with its class weights."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def logits(self, embeddings: Tensor) -> Tensor:
        """Cosine to each class weight (no margin): the prediction at test time."""
        return F.normalize(embeddings, dim=1) @ F.normalize(self.loss.W, dim=0)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels)


def make_head(name: str, num_classes: int, embedding_dim: int, margin: float | None = None,
              scale: float | None = None) -> nn.Module:
    """The head `name` (see HEADS). margin: None = the reference setting above, in the head's own unit
    (arcface: radians, cosface: cosine, sphereface: integer factor, l2_softmax: alpha, center: lambda)."""
    if name == "softmax":
        return SoftmaxHead(num_classes, embedding_dim)
    if name == "l2_softmax":
        return SoftmaxHead(num_classes, embedding_dim, alpha=margin or L2_SOFTMAX_ALPHA)
    if name == "center":
        return SoftmaxHead(num_classes, embedding_dim, center_weight=margin or CENTER_WEIGHT)
    if name == "arcface":
        m_deg = math.degrees(margin if margin is not None else ARCFACE_MARGIN_RAD)
        return MarginHead(pml.ArcFaceLoss(num_classes, embedding_dim, margin=m_deg, scale=scale or MARGIN_SCALE))
    if name == "cosface":
        m = margin if margin is not None else COSFACE_MARGIN
        return MarginHead(pml.CosFaceLoss(num_classes, embedding_dim, margin=m, scale=scale or MARGIN_SCALE))
    if name == "sphereface":
        m = int(margin if margin is not None else SPHEREFACE_MARGIN)
        return MarginHead(pml.SphereFaceLoss(num_classes, embedding_dim, margin=m, scale=scale or 1.0))
    raise ValueError(f"unknown head '{name}'; known: {', '.join(HEADS)}")
