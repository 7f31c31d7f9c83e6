"""Pure metric functions: numpy in, float out. Scores: higher = more anomalous; labels 1 = anomalous."""

from anomalab.metrics.image import aupr, image_auroc, roc_curve
from anomalab.metrics.pixel import aupro, pixel_auroc, pro_curve

__all__ = ["aupr", "aupro", "image_auroc", "pixel_auroc", "pro_curve", "roc_curve"]
