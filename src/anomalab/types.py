"""Plain data records: ImageSet (data in), Threshold (decision), Evaluation (results out).

Records check themselves when built: inconsistent image data is a DataError, a bad threshold setting or
record a ParameterError (both UserErrors, and ValueErrors)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomalab.errors import DataError, ParameterError


@dataclass
class ImageSet:
    """A set of images with optional labels, masks and class ids.

    images:  (N, C, H, W) float32 in [0, 1]
    labels:  (N,) int64, 0 normal / 1 anomalous, or None (e.g. a training set of normals)
    masks:   (N, H, W) float32 in {0, 1} (1 = defective pixel), or None
    classes: (N,) int64 class id (MNIST digit, defect type, ...), names in meta["class_names"], or None
    names:   one name per image (file name or "<set>/<index>")
    meta:    free JSON-able description (source, split, anomaly digit, ...)
    """

    images: Tensor
    labels: Tensor | None = None
    masks: Tensor | None = None
    classes: Tensor | None = None
    names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor):
            self.images = torch.as_tensor(np.asarray(self.images))
        if self.images.ndim != 4:
            raise DataError(f"ImageSet.images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        self.images = self.images.float()
        n = len(self.images)
        for key in ("labels", "classes"):
            value = getattr(self, key)
            if value is not None:
                value = torch.as_tensor(value).long().reshape(-1)
                if len(value) != n:
                    raise DataError(f"ImageSet.{key} has {len(value)} entries for {n} images")
                setattr(self, key, value)
        if self.masks is not None:
            self.masks = torch.as_tensor(self.masks).float()
            if self.masks.shape != (n, *self.images.shape[2:]):
                raise DataError(
                    f"ImageSet.masks must be (N, H, W) = {(n, *self.images.shape[2:])}, "
                    f"got {tuple(self.masks.shape)}"
                )
        if not self.names:
            prefix = self.meta.get("name", "image")
            self.names = [f"{prefix}/{i}" for i in range(n)]
        elif len(self.names) != n:
            raise DataError(f"ImageSet.names has {len(self.names)} entries for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: Tensor | np.ndarray | list[int]) -> ImageSet:
        """The images at `index` (ints or a boolean mask), with their labels, masks, classes and names."""
        idx = torch.as_tensor(np.asarray(index))
        if idx.dtype == torch.bool:
            idx = idx.nonzero().reshape(-1)
        idx = idx.long()

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return ImageSet(
            images=self.images[idx],
            labels=pick(self.labels),
            masks=pick(self.masks),
            classes=pick(self.classes),
            names=[self.names[i] for i in idx.tolist()],
            meta=dict(self.meta),
        )

    @staticmethod
    def concat(sets: list[ImageSet], meta: dict[str, Any] | None = None) -> ImageSet:
        """Join sets of the same image shape; labels/masks/classes kept only where every set has them."""
        if not sets:
            raise DataError("ImageSet.concat needs at least one set")
        shapes = {s.shape for s in sets}
        if len(shapes) != 1:
            raise DataError(f"cannot concatenate image sets of different shapes: {sorted(shapes)}")

        def join(key: str) -> Tensor | None:
            parts = [getattr(s, key) for s in sets]
            return None if any(p is None for p in parts) else torch.cat(parts)

        return ImageSet(
            images=torch.cat([s.images for s in sets]),
            labels=join("labels"),
            masks=join("masks"),
            classes=join("classes"),
            names=[n for s in sets for n in s.names],
            meta=dict(meta if meta is not None else sets[0].meta),
        )


THRESHOLD_METHODS = ("quantile", "value")
THRESHOLD_BASES = ("holdout", "crossfit", "train", "normal", "none")


@dataclass
class Threshold:
    """A decision threshold fitted on the scores of normal images only.

    method "quantile": value is the (1 - max_fpr) quantile of n_normal normal scores, so about `max_fpr` of
    normal images score above it. method "value": value was set by hand; max_fpr is then the fraction of the
    n_normal kept normal scores above it (0 and 0 when there were none). A score strictly above `value` is
    called anomalous.

    basis: where the normal scores came from: "holdout" (training images held out of the fit), "crossfit"
    (every training image scored by a detector fitted without it), "train" (the training images themselves:
    optimistic), "normal" (normal images given for the purpose), "none" (no scores). pixel_value: the pixel
    threshold of the anomaly maps (a defect mask is map > pixel_value), or None. created: when it was set
    (ISO 8601, UTC), or None. Records from before these fields existed load with their defaults.
    """

    value: float
    max_fpr: float
    n_normal: int
    method: str = "quantile"
    basis: str = "normal"
    pixel_value: float | None = None
    created: str | None = None

    @classmethod
    def fit(cls, normal_scores: Tensor | np.ndarray, max_fpr: float = 0.01, *, basis: str = "normal",
            pixel_value: float | None = None, created: str | None = None) -> Threshold:
        scores = np.asarray(torch.as_tensor(normal_scores).detach().cpu(), dtype=np.float64).reshape(-1)
        if scores.size == 0:
            raise DataError("Threshold.fit needs at least one normal score")
        if not np.all(np.isfinite(scores)):
            raise DataError("Threshold.fit got non-finite scores")
        if not 0.0 <= max_fpr < 1.0:
            raise ParameterError(f"max_fpr must be in [0, 1), got {max_fpr}")
        value = float(np.quantile(scores, 1.0 - max_fpr, method="higher"))
        return cls(value=value, max_fpr=float(max_fpr), n_normal=int(scores.size), basis=basis,
                   pixel_value=pixel_value, created=created)

    def predict(self, scores: Tensor | np.ndarray) -> np.ndarray:
        """Boolean array: True = anomalous."""
        return np.asarray(torch.as_tensor(scores).detach().cpu()) > self.value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Threshold:
        """The inverse of `to_dict`; a ParameterError for a record that is not one (missing or unknown keys,
        a non-finite value, max_fpr outside [0, 1) ([0, 1] for a hand-set value), n_normal not a positive
        integer (>= 0 for a hand-set value), an unknown method or basis). The keys value, max_fpr and
        n_normal are required; method, basis, pixel_value and created are optional (older records)."""
        if not isinstance(d, dict):
            raise ParameterError(f"threshold must be a JSON object, got {type(d).__name__}")
        keys = {"value", "max_fpr", "n_normal"}
        optional = {"method", "basis", "pixel_value", "created"}
        if not keys <= set(d) or not set(d) <= keys | optional:
            raise ParameterError(f"threshold must have exactly the keys {sorted(keys)} and optionally "
                                 f"{sorted(optional)}, got {sorted(d)}")

        def number(key: str) -> float:
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ParameterError(f"threshold {key} must be a finite number, got {v!r}")
            return float(v)

        method = d.get("method", "quantile")
        if method not in THRESHOLD_METHODS:
            raise ParameterError(f"threshold method must be one of {', '.join(THRESHOLD_METHODS)}, got {method!r}")
        basis = d.get("basis", "normal")
        if basis not in THRESHOLD_BASES:
            raise ParameterError(f"threshold basis must be one of {', '.join(THRESHOLD_BASES)}, got {basis!r}")
        by_hand = method == "value"
        value, max_fpr = number("value"), number("max_fpr")
        if not (0.0 <= max_fpr <= 1.0 if by_hand else 0.0 <= max_fpr < 1.0):
            raise ParameterError(f"threshold max_fpr must be in [0, {'1]' if by_hand else '1)'}, got {max_fpr}")
        n = d["n_normal"]
        if isinstance(n, bool) or not isinstance(n, int) or n < (0 if by_hand else 1):
            raise ParameterError(f"threshold n_normal must be a {'non-negative' if by_hand else 'positive'} "
                                 f"integer, got {n!r}")
        pixel = None if d.get("pixel_value") is None else number("pixel_value")
        created = d.get("created")
        if created is not None and not isinstance(created, str):
            raise ParameterError(f"threshold created must be a date string or null, got {created!r}")
        return cls(value=value, max_fpr=max_fpr, n_normal=n, method=method, basis=basis, pixel_value=pixel,
                   created=created)


def _clean(value: Any) -> Any:
    """JSON-safe copy: tensors/arrays to lists, NaN to None."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class Evaluation:
    """The record of one detector on one test set; JSON-serialisable (maps are kept in memory only).

    scores: (N,) higher = more anomalous; labels: (N,) 0/1; metrics: name -> float.
    """

    detector: str
    dataset: str
    scores: np.ndarray
    labels: np.ndarray
    metrics: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    classes: np.ndarray | None = None
    normalize: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    maps: Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "maps"}
        return _clean(d)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        d = dict(d)
        d["scores"] = np.asarray(d["scores"], dtype=np.float64)
        d["labels"] = np.asarray(d["labels"], dtype=np.int64)
        if d.get("classes") is not None:
            d["classes"] = np.asarray(d["classes"], dtype=np.int64)
        d["metrics"] = {k: (float("nan") if v is None else v) for k, v in d["metrics"].items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> Evaluation:
        return cls.from_dict(json.loads(Path(path).read_text()))
