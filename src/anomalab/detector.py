"""The detector API every method shares: fit on normal images, score, map, save, load.

A detector's `__init__` stores hyper-parameters only. `fit` sees the data, builds the networks for the
image shape it declares (`_model_shape`), trains, and records fitted state in attributes ending in `_`.
Saving writes `weights.safetensors` (every tensor) and `detector.json` (name, params, input shape,
version, threshold, JSON-able fitted state). Loading rebuilds the detector from its params and never
unpickles anything.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from anomalab import __version__
from anomalab.data.transforms import check_images, prepare, resize_maps
from anomalab.types import ImageSet, Threshold

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "detector.json"


@runtime_checkable
class Detector(Protocol):
    def fit(self, train: ImageSet) -> Detector: ...
    def score(self, images: Tensor) -> Tensor: ...
    def score_map(self, images: Tensor) -> Tensor: ...
    def save(self, path: str | Path) -> None: ...


@runtime_checkable
class Generative(Protocol):
    """A detector that can decode new images from its prior (generative replay, pseudo-anomalies)."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...


@runtime_checkable
class Trainable(Protocol):
    """A gradient-trained detector whose training loss on a batch can be wrapped (EWC, replay)."""

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, float]]: ...


@runtime_checkable
class Embedder(Protocol):
    def embed(self, images: Tensor) -> Tensor: ...


class NotFittedError(RuntimeError):
    pass


class LoadError(RuntimeError):
    pass


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Params:
    """Hyper-parameters are the `__init__` arguments, stored under their own names (scikit-learn style);
    shared by detectors and the other saved models (beta_vaegan)."""

    @classmethod
    def param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def device_(self) -> torch.device:
        return resolve_device(getattr(self, "device", "cpu"))


def nets_state(nets: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Every network's state_dict under "<net>.<key>", on the CPU, ready for safetensors."""
    return {f"{name}.{k}": v.detach().cpu().contiguous() for name, net in nets.items()
            for k, v in net.state_dict().items()}


def load_nets_state(nets: dict[str, nn.Module], tensors: dict[str, Tensor], device: torch.device,
                    where: str) -> None:
    """Load `nets_state` output back into `nets` (every key must match) and move them to `device`."""
    for name, net in nets.items():
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LoadError(f"{where}: weights do not match {name} "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        net.to(device)


class BaseDetector(Params):
    """Shared procedure: input checks, batching, device, save/load. Subclasses implement

    - `_fit(x: Tensor (N,C,H,W) prepared, train: ImageSet)`: train / estimate, set fitted attributes;
    - `_score_batch(x) -> (B,)` and optionally `_map_batch(x) -> (B,H,W)` at model resolution;
    - `_build(shape)`: create the networks for a (C, H, W) input (used by fit and by load);
    - `_nets()`: name -> nn.Module to save; `_fitted_tensors`: tensor attributes to save.
    """

    name: ClassVar[str] = ""
    _fitted_tensors: ClassVar[tuple[str, ...]] = ()
    _fitted_json: ClassVar[tuple[str, ...]] = ("history_",)
    score_batch_size: ClassVar[int] = 256
    onnx_exportable: ClassVar[bool] = False  # True where _score_batch/_map_batch trace to ONNX (export.py)

    # ---- state --------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return getattr(self, "input_shape_", None) is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{self.name or type(self).__name__} is not fitted: call fit(train) first")

    def _nets(self) -> dict[str, nn.Module]:
        return {}

    def _build(self, shape: tuple[int, int, int]) -> None:
        """Create networks for a (C, H, W) input. Detectors without networks need nothing here."""

    def _model_shape(self, data_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The (C, H, W) the model works at, given the training data's shape. Default: the data's."""
        return data_shape

    # ---- fit / score --------------------------------------------------------------------------
    def fit(self, train: ImageSet | Tensor) -> BaseDetector:
        """Fit on normal images. train: ImageSet (labels ignored) or a (N, C, H, W) tensor in [0, 1]."""
        images = train.images if isinstance(train, ImageSet) else train
        check_images(images, what=f"{self.name}.fit")
        if not isinstance(train, ImageSet):
            train = ImageSet(images=images)
        shape = self._model_shape(tuple(images.shape[1:]))
        x = prepare(images, shape)
        self.input_shape_ = tuple(int(s) for s in shape)
        self.history_ = []
        self.threshold_ = None
        self._build(self.input_shape_)
        self._fit(x, train)
        return self

    def _fit(self, x: Tensor, train: ImageSet) -> None:
        raise NotImplementedError

    def _score_batch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _map_batch(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name} has no anomaly map (score_map)")

    def _batched(self, fn, images: Tensor, batch_size: int | None) -> Tensor:
        self._check_fitted()
        check_images(images, what=f"{self.name}.score")
        bs = batch_size or self.score_batch_size
        for net in self._nets().values():
            net.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), bs):
                x = prepare(images[i : i + bs], self.input_shape_).to(self.device_)
                out.append(fn(x).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def score(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images (N, C, H, W) in [0, 1] -> (N,) float scores, higher = more anomalous."""
        return self._batched(self._score_batch, images, batch_size)

    def score_map(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images (N, C, H, W) in [0, 1] -> (N, H, W) anomaly maps at input resolution,
        higher = more anomalous."""
        maps = self._batched(self._map_batch, images, batch_size)
        return resize_maps(maps, tuple(images.shape[-2:]))

    # ---- threshold ----------------------------------------------------------------------------
    def fit_threshold(self, normal: ImageSet | Tensor, max_fpr: float = 0.01) -> Threshold:
        """Fit the decision threshold on normal images only (never on a test set) and keep it."""
        images = normal.images if isinstance(normal, ImageSet) else normal
        self.threshold_ = Threshold.fit(self.score(images), max_fpr=max_fpr)
        return self.threshold_

    # ---- save / load --------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        tensors = nets_state(self._nets())
        for attr in self._fitted_tensors:
            value = getattr(self, attr, None)
            if value is not None:
                tensors[f"fitted.{attr}"] = torch.as_tensor(value).detach().cpu().contiguous()
        return tensors

    def save(self, path: str | Path) -> None:
        """Write `path/weights.safetensors` and `path/detector.json`."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.state_tensors(), str(path / WEIGHTS_FILE))
        fitted = {attr: getattr(self, attr, None) for attr in self._fitted_json}
        meta = {
            "format_version": FORMAT_VERSION,
            "anomalab_version": __version__,
            "name": self.name,
            "params": self.get_params(),
            "input_shape": list(self.input_shape_),
            "threshold": self.threshold_.to_dict() if self.threshold_ is not None else None,
            "fitted": fitted,
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> BaseDetector:
        path = Path(path)
        meta = read_meta(path)
        if meta["name"] != cls.name:
            raise LoadError(f"{path} holds a '{meta['name']}' detector, not '{cls.name}'")
        det = cls(**meta["params"])
        det.input_shape_ = tuple(meta["input_shape"])
        det.threshold_ = Threshold.from_dict(meta["threshold"]) if meta.get("threshold") else None
        for attr, value in meta.get("fitted", {}).items():
            setattr(det, attr, value)
        tensors = load_file(str(path / WEIGHTS_FILE))
        det._build(det.input_shape_)
        load_nets_state(det._nets(), tensors, det.device_, f"{path / WEIGHTS_FILE} ({cls.name})")
        for attr in cls._fitted_tensors:
            if f"fitted.{attr}" in tensors:
                setattr(det, attr, tensors[f"fitted.{attr}"].to(det.device_))
        det._after_load()
        return det

    def _after_load(self) -> None:
        """Hook for detectors that derive state from loaded tensors."""


def read_meta(path: Path, meta_file: str = META_FILE) -> dict[str, Any]:
    """Read and check the JSON file (`detector.json`, or another model's `meta_file`) of a saved folder
    beside its weights.safetensors: both present, same format, same anomalab major.minor."""
    if not path.is_dir():
        raise LoadError(f"no saved detector at {path} (not a folder)")
    for f in (meta_file, WEIGHTS_FILE):
        if not (path / f).is_file():
            raise LoadError(f"{path} is not a complete saved detector: {f} is missing")
    try:
        meta = json.loads((path / meta_file).read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{path / meta_file} is not valid JSON: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise LoadError(
            f"{path} was saved in format {meta.get('format_version')!r} "
            f"(anomalab {meta.get('anomalab_version')}); this anomalab {__version__} reads format "
            f"{FORMAT_VERSION}: refit the detector with this version"
        )
    saved = str(meta.get("anomalab_version", "?")).split(".")[:2]
    if saved != __version__.split(".")[:2]:
        raise LoadError(
            f"{path} was saved by anomalab {meta.get('anomalab_version')}, this is {__version__}: "
            "refit the detector with this version"
        )
    return meta
