"""One explicit table of detectors: name -> "module:Class", imported lazily on first use."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from anomalab.detector import BaseDetector, read_meta
from anomalab.errors import LoadError
from anomalab.params import choose, validate

REGISTRY: dict[str, str] = {
    "conv_ae": "anomalab.detectors.conv_ae:ConvAE",
    "vae": "anomalab.detectors.vae:VAE",
    "knn": "anomalab.detectors.knn:KNN",
    "pca": "anomalab.detectors.pca:PCA",
    "anogan": "anomalab.detectors.anogan:AnoGAN",
    "egbad": "anomalab.detectors.egbad:EGBAD",
    "ganomaly": "anomalab.detectors.ganomaly:GANomaly",
    "skip_ganomaly": "anomalab.detectors.skip_ganomaly:SkipGANomaly",
    "gaussian": "anomalab.detectors.gaussian:Gaussian",
    "metric": "anomalab.detectors.metric:Metric",
}


def list_detectors() -> list[str]:
    """Names accepted by `create`, in table order."""
    return list(REGISTRY)


def detector_class(name: str) -> type[BaseDetector]:
    module, cls = REGISTRY[choose(name, REGISTRY, "detector")].split(":")
    return getattr(importlib.import_module(module), cls)


def create(name: str, **params: Any) -> BaseDetector:
    """A new, unfitted detector: `create("vae", latent_dim=16, epochs=10)`. Parameters are checked and
    converted by `anomalab.params.validate` (strings from a command line are converted to their types);
    a wrong name, type or value is a `ParameterError` naming the parameter."""
    cls = detector_class(name)
    return cls(**validate(cls, params, owner=name))


def load(path: str | Path) -> BaseDetector:
    """Load a saved detector from its folder, or from a run folder holding `detector/`."""
    path = Path(path)
    if (path / "detector").is_dir():
        path = path / "detector"
    meta = read_meta(path)
    if meta["name"] not in REGISTRY:
        raise LoadError(f"{path} holds an unknown detector '{meta['name']}'")
    return detector_class(meta["name"]).load(path)
