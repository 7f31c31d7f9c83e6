"""anomalab: deep-learning image anomaly detection that learns normal images, scores, localises and
generates anomalies. Public API: create, list_detectors, load, evaluate, ImageSet, Evaluation, Threshold."""

__version__ = "0.1.0"

from anomalab.detector import BaseDetector, Detector, Embedder, Generative, Trainable  # noqa: E402
from anomalab.evaluate import evaluate  # noqa: E402
from anomalab.registry import create, list_detectors, load  # noqa: E402
from anomalab.types import Evaluation, ImageSet, Threshold  # noqa: E402

__all__ = [
    "BaseDetector",
    "Detector",
    "Embedder",
    "Evaluation",
    "Generative",
    "ImageSet",
    "Threshold",
    "Trainable",
    "__version__",
    "create",
    "evaluate",
    "list_detectors",
    "load",
]
