"""The detector API every method shares: fit on normal images, score, map, save, load.

A detector's `__init__` stores hyper-parameters only. `fit` sees the data, builds the networks for the
image shape it declares (`_model_shape`), trains, and records fitted state in attributes ending in `_`.
Saving writes `weights.safetensors` (every tensor) and `detector.json` (name, params, input shape,
version, threshold, JSON-able fitted state), atomically (the folder is built beside its target and
renamed). Loading checks both files, rebuilds the detector from its validated params and never unpickles
anything; a file that is not what saving writes is a one-line LoadError naming it.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from anomalab._version import __version__
from anomalab.data.transforms import check_images, prepare, resize_maps
from anomalab.errors import DataError, LoadError, NotFittedError, ParameterError, RunFolderError
from anomalab.params import validate
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
    """A gradient-trained detector that can keep training (`anomalab.train.epochs.EpochTrained`).

    `train_more(x, epochs=None, *, step=None, desc=None, on_step=None)` trains the current networks
    further on prepared images x (N, C, H, W) in [0, 1]; `optimizers_` (name -> optimizer) persist
    between calls until `reset_optimizers()`; `continual_strategies` names the strategies of
    `anomalab.continual` its training takes. A detector trained by one loss and one optimiser also has
    `loss(batch) -> (loss, logs)` (`anomalab.train.epochs.SingleLoss`), which ewc extends.
    """

    continual_strategies: tuple[str, ...]

    def train_more(self, x: Tensor, epochs: int | None = None, *, step=None, desc: str | None = None,
                   on_step=None) -> None: ...

    def reset_optimizers(self) -> None: ...


@runtime_checkable
class Embedder(Protocol):
    def embed(self, images: Tensor) -> Tensor: ...




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
        if len(images) == 0:
            raise DataError(f"{self.name}.fit: no images to fit on")
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
    def fit_threshold(self, normal: ImageSet | Tensor, max_fpr: float = 0.01, *, pixel: bool = False,
                      basis: str = "normal") -> Threshold:
        """Fit the decision threshold on normal images only (never on a test set) and keep it: the
        (1 - max_fpr) quantile of their scores. pixel=True also fits the pixel threshold where the detector
        has maps: the same quantile of each image's hottest map pixel (`anomalab.thresholds`). basis: where
        the images come from, recorded in the Threshold."""
        from anomalab.thresholds import normal_statistics, threshold_from

        images = normal.images if isinstance(normal, ImageSet) else normal
        self.threshold_ = threshold_from(normal_statistics(self, images, maps=pixel), max_fpr, basis=basis)
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
        """Write `path/weights.safetensors` and `path/detector.json` as one folder, atomically: it is built
        beside `path` and renamed into place, so `path` holds the old detector or the new one, never a mix.
        Other files of an earlier saved detector there are kept; a folder that holds files but no
        detector.json (not a saved detector) is refused with a RunFolderError and left as it is."""
        self._check_fitted()
        tensors = self.state_tensors()
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
        text = json.dumps(meta, indent=1, default=str)

        def write(folder: Path) -> None:
            save_file(tensors, str(folder / WEIGHTS_FILE))
            (folder / META_FILE).write_text(text)

        # tiling.json (anomalab.tiling) is not carried over: a detector saved here on its own is not tiled
        write_saved_folder(path, META_FILE, write, own=(WEIGHTS_FILE, META_FILE, "tiling.json"), what="detector")

    @classmethod
    def load(cls, path: str | Path) -> BaseDetector:
        """The detector saved in `path`. Everything in the folder is checked first: a file that is not
        what `save` writes (bad JSON or types, unknown keys, params `validate` refuses, a truncated or
        foreign weights file, unexpected tensors, NaN or infinite values) is a one-line LoadError naming it."""
        path = Path(path)
        meta = read_meta(path)
        meta_file, weights_file = path / META_FILE, path / WEIGHTS_FILE
        if meta["name"] != cls.name:
            raise LoadError(f"{path} holds a '{meta['name']}' detector, not '{cls.name}'")
        shape = meta.get("input_shape")
        if not (isinstance(shape, list) and len(shape) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise LoadError(f"{meta_file}: input_shape must be 3 positive integers [C, H, W], got {shape!r}")
        try:
            threshold = None if meta.get("threshold") is None else Threshold.from_dict(meta["threshold"])
        except ParameterError as e:
            raise LoadError(f"{meta_file}: {e}") from None
        fitted = meta.get("fitted", {})
        if not isinstance(fitted, dict):
            raise LoadError(f"{meta_file}: fitted must be a JSON object, got {type(fitted).__name__}")
        unknown = sorted(set(fitted) - set(cls._fitted_json))
        if unknown:
            raise LoadError(f"{meta_file}: fitted has unknown key(s) {', '.join(unknown)}; {cls.name} keeps "
                            f"{', '.join(cls._fitted_json) or 'none'}")
        try:
            det = cls(**validate(cls, meta["params"], owner=cls.name))
        except ParameterError as e:
            raise LoadError(f"{meta_file}: {e}") from None
        det.input_shape_ = tuple(shape)
        det.threshold_ = threshold
        for attr, value in fitted.items():
            setattr(det, attr, value)
        tensors = read_tensors(weights_file)
        det._build(det.input_shape_)
        nets = det._nets()
        allowed = {f"fitted.{attr}" for attr in cls._fitted_tensors}
        stray = sorted(k for k in tensors if k not in allowed and not any(k.startswith(f"{n}.") for n in nets))
        if stray:
            raise LoadError(f"{weights_file}: unexpected tensor(s) for {cls.name}: {', '.join(stray[:3])}")
        try:
            load_nets_state(nets, tensors, det.device_, f"{weights_file} ({cls.name})")
        except LoadError:
            raise
        except RuntimeError as e:  # shapes that do not fit the networks built from the params
            reason = str(e).strip().splitlines()[-1].strip()
            raise LoadError(f"{weights_file}: weights do not fit {cls.name}: {reason}") from None
        for attr in cls._fitted_tensors:
            if f"fitted.{attr}" in tensors:
                setattr(det, attr, tensors[f"fitted.{attr}"].to(det.device_))
        det._after_load()
        return det

    def _after_load(self) -> None:
        """Hook for detectors that derive state from loaded tensors."""


DETECTOR_KEYS = ("format_version", "anomalab_version", "name", "params", "input_shape", "threshold", "fitted")


def read_meta(path: Path, meta_file: str = META_FILE, keys: tuple[str, ...] = DETECTOR_KEYS) -> dict[str, Any]:
    """Read and check the JSON file (`detector.json`, or another model's `meta_file` with its `keys`) of
    a saved folder beside its weights.safetensors: both present, a JSON object of known keys only, same
    format, same anomalab major.minor, a name and a params object. Each problem is a one-line LoadError."""
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"no saved detector at {path} (not a folder)")
    for f in (meta_file, WEIGHTS_FILE):
        if not (path / f).is_file():
            raise LoadError(f"{path} is not a complete saved detector: {f} is missing")
    file = path / meta_file
    try:
        meta = json.loads(file.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LoadError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise LoadError(f"{file} is not a JSON object (it holds a {type(meta).__name__})")
    version = meta.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise LoadError(
            f"{path} was saved in format {version!r} "
            f"(anomalab {meta.get('anomalab_version')}); this anomalab {__version__} reads format "
            f"{FORMAT_VERSION}: refit the detector with this version"
        )
    saved = str(meta.get("anomalab_version", "?")).split(".")[:2]
    if saved != __version__.split(".")[:2]:
        raise LoadError(
            f"{path} was saved by anomalab {meta.get('anomalab_version')}, this is {__version__}: "
            "refit the detector with this version"
        )
    unknown = sorted(set(meta) - set(keys))
    if unknown:
        raise LoadError(f"{file}: unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(keys)}")
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        raise LoadError(f"{file}: name must be a non-empty string, got {meta.get('name')!r}")
    if not isinstance(meta.get("params"), dict):
        raise LoadError(f"{file}: params must be a JSON object, got {type(meta.get('params')).__name__}")
    return meta


def read_tensors(file: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file; a LoadError naming it when it is truncated, not safetensors,
    or holds NaN or infinite values."""
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{file} is not a readable safetensors file ({e})") from None
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise LoadError(f"{file}: tensor {key} holds NaN or infinite values")
    return tensors


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_saved_folder(path: str | Path, meta_file: str, write: Callable[[Path], None], own: Collection[str],
                       what: str = "detector") -> Path:
    """Write a saved-model folder atomically: `write(tmp)` fills a hidden sibling of `path`, which then
    replaces `path` (anomalab.runs.atomic.staged_dir, under its per-target lock). Entries of the old folder
    that are not in `own` are carried over (hard links, else copies); `path` must be new, empty, or an
    earlier saved folder (holding `meta_file`), else a RunFolderError leaves it untouched."""
    from anomalab.runs.atomic import TargetLock, staged_dir  # the runs package imports this module

    path = Path(path)
    with TargetLock(path):
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"cannot save the {what} to {path}: it is a file")
        if path.is_dir() and any(path.iterdir()) and not (path / meta_file).is_file():
            raise RunFolderError(f"cannot save the {what} to {path}: the folder holds other files and no "
                                 f"{meta_file} (not a saved {what}); choose a new or empty folder")
        with staged_dir(path) as tmp:
            write(tmp)
            if path.is_dir():
                for entry in path.iterdir():
                    if entry.name in own or (tmp / entry.name).exists():
                        continue
                    if entry.is_symlink():
                        os.symlink(os.readlink(entry), tmp / entry.name)
                    elif entry.is_dir():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(str(entry), str(tmp / entry.name))
    return path
