"""anomalab: deep-learning image anomaly detection that learns normal images, scores, localises and
generates anomalies. Public API: create, list_detectors, load, evaluate, ImageSet, Evaluation, Threshold.

The names are imported on first use (PEP 562), so `import anomalab` and the command line's `--help` stay
quick and torch loads only when a detector or data record is needed."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from anomalab._version import __version__  # noqa: F401  (public: anomalab.__version__)

_API = {
    "BaseDetector": "anomalab.detector", "Detector": "anomalab.detector", "Embedder": "anomalab.detector",
    "Generative": "anomalab.detector", "Trainable": "anomalab.detector",
    "evaluate": "anomalab.evaluation",
    "create": "anomalab.registry", "list_detectors": "anomalab.registry", "load": "anomalab.registry",
    "Evaluation": "anomalab.types", "ImageSet": "anomalab.types", "Threshold": "anomalab.types",
}

__all__ = sorted([*_API, "__version__"])

if TYPE_CHECKING:
    from anomalab.detector import BaseDetector, Detector, Embedder, Generative, Trainable  # noqa: F401
    from anomalab.evaluation import evaluate  # noqa: F401
    from anomalab.registry import create, list_detectors, load  # noqa: F401
    from anomalab.types import Evaluation, ImageSet, Threshold  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'anomalab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
