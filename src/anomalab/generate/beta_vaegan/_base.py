"""What the teacher and the student share: parameters, step-based training on rendered batches,
encoding, and save/load as a folder of `weights.safetensors` + `model.json` (no pickle)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from anomalab._version import __version__
from anomalab.data.transforms import check_images, prepare
from anomalab.detector import (
    FORMAT_VERSION,
    WEIGHTS_FILE,
    LoadError,
    NotFittedError,
    Params,
    load_nets_state,
    nets_state,
    read_meta,
    read_tensors,
    write_saved_folder,
)
from anomalab.errors import ParameterError
from anomalab.params import validate
from anomalab.train.loop import run_epochs

META_FILE = "model.json"  # beside weights.safetensors; checked like detector.json (format, version)
# the optimisers' state (Adam moments and step counts), so that training resumed from a saved folder in a new
# process continues exactly as an uncut run would (without it Adam restarts from zero moments)
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_KEYS = ("format_version", "anomalab_version", "name", "params", "steps_done", "history")


class DrawnBatches:
    """`steps` batches from `draw(rng)`, split into passes of `per_pass` batches so that `run_epochs`
    logs a loss history every `per_pass` steps. The data are rendered on demand, never stored."""

    def __init__(self, draw: Callable[[np.random.Generator], Any], steps: int, per_pass: int,
                 rng: np.random.Generator):
        self.draw, self.remaining, self.per_pass, self.rng = draw, int(steps), int(per_pass), rng

    def __len__(self) -> int:
        return min(self.per_pass, max(self.remaining, 1))

    def __iter__(self) -> Iterator[Any]:
        for _ in range(min(self.per_pass, self.remaining)):
            self.remaining -= 1
            yield self.draw(self.rng)


class LatentModel(Params):
    """Base of BetaVAE and BetaVAEGAN. Subclasses set `name`, `channels`, build `encoder_` (and more)
    and their optimisers in `_build()`, list the nets in `_nets()`, and implement `_train_step(batch)`
    and `_draw(rng)`.

    Training differs from the detectors' `train_more(x, epochs, ...)` (`anomalab.train.epochs`) on
    purpose: the data are rendered on demand from generative factors (dSprites), never a tensor of
    images, and a run is measured in optimiser steps (an epoch of dSprites is 11,520 steps); so
    `train_more(steps)` takes steps, and its data stream is a function of seed and steps done, which
    makes a run resumable from a saved folder (the optimisers' moments are saved too)."""

    name: ClassVar[str] = ""
    channels: ClassVar[int] = 1
    log_every: ClassVar[int] = 100
    # the attributes `_build` stores optimisers in, in this order (the key prefixes of OPTIMIZER_FILE);
    # a model saves and restores those it has
    optimizer_attrs: ClassVar[tuple[str, ...]] = ("optimizer_", "optimizer_d_")
    progress: bool = True

    @property
    def optimizers_(self) -> dict[str, torch.optim.Optimizer]:
        """attribute name -> optimiser, for each of `optimizer_attrs` this model has."""
        return {a: getattr(self, a) for a in self.optimizer_attrs if getattr(self, a, None) is not None}

    @property
    def beta_now(self) -> float:
        """beta at the current step: the full beta, or its linear warm-up when kl_warmup_steps > 0."""
        warmup = getattr(self, "kl_warmup_steps", 0)
        if warmup <= 0:
            return self.beta
        return self.beta * min(1.0, getattr(self, "steps_done_", 0) / warmup)

    @property
    def is_fitted(self) -> bool:
        return getattr(self, "encoder_", None) is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{self.name} is not fitted: call fit(...) first")

    def _nets(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _build(self) -> None:
        raise NotImplementedError

    def _train_step(self, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def _draw(self, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def _start(self) -> None:
        torch.manual_seed(self.seed)
        self._build()
        for net in self._nets().values():
            net.to(self.device_)
        self.steps_done_ = 0
        self.history_: list[dict[str, float]] = []

    def train_more(self, steps: int) -> None:
        """Train `steps` more optimiser steps (resumable: the data stream depends on seed and steps done)."""
        self._check_fitted()
        torch.manual_seed(self.seed + self.steps_done_)
        rng = np.random.default_rng([self.seed, self.steps_done_])
        for net in self._nets().values():
            net.train()
        passes = -(-steps // self.log_every)
        loader = DrawnBatches(self._draw, steps, self.log_every, rng)
        done = self.steps_done_

        def log_step(epoch: int, means: dict[str, float]) -> None:
            means["step"] = min(done + (epoch + 1) * self.log_every, done + steps)

        def counted_step(batch: Any) -> dict[str, float]:
            logs = self._train_step(batch)
            self.steps_done_ += 1
            return logs

        self.history_ += run_epochs(counted_step, loader, passes, progress=self.progress,
                                    desc=f"{self.name} fit", on_epoch_end=log_step)

    # ---- inference -----------------------------------------------------------------------------
    def _prepare(self, images: Tensor) -> Tensor:
        check_images(images, what=f"{self.name}.encode")
        return prepare(images, (self.channels, 64, 64)).to(self.device_)

    def encode(self, images: Tensor, batch_size: int = 1024) -> Tensor:
        """images (N, C, H, W) in [0, 1] (resized to 64x64, gray <-> RGB as needed) -> posterior means (N, D)."""
        self._check_fitted()
        self.encoder_.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                out.append(self.encoder_(self._prepare(images[i : i + batch_size]))[0].float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.encoder_.latent_dim)

    def decode(self, z: Tensor, batch_size: int = 1024) -> Tensor:
        """codes (N, D) -> images (N, C, 64, 64) in [0, 1]."""
        self._check_fitted()
        self.decoder_.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(z), batch_size):
                out.append(torch.sigmoid(self.decoder_(z[i : i + batch_size].float().to(self.device_))).cpu())
        return torch.cat(out) if out else torch.empty(0, self.channels, 64, 64)

    def traverse(self, dim: int, values: Tensor | np.ndarray | list[float], base: Tensor | None = None) -> Tensor:
        """Latent traversal: decode `base` (D,) (default: zeros) with dimension `dim` set to each of
        `values` -> (len(values), C, 64, 64)."""
        self._check_fitted()
        d = self.encoder_.latent_dim
        if not 0 <= dim < d:
            raise ValueError(f"dim must be in [0, {d}), got {dim}")
        values = torch.as_tensor(np.asarray(values, dtype=np.float32))
        z = (torch.zeros(d) if base is None else torch.as_tensor(base).float().reshape(d)).repeat(len(values), 1)
        z[:, dim] = values
        return self.decode(z)

    # ---- save / load ---------------------------------------------------------------------------
    def _optimizer_state(self) -> dict[str, Tensor]:
        """The optimisers' per-parameter state as flat tensors '{optimizer}.{param index}.{key}'
        (hyper-parameters are rebuilt from the model's params, so only the tensors are kept)."""
        flat = {}
        for name, opt in self.optimizers_.items():
            for pid, state in opt.state_dict()["state"].items():
                for key, value in state.items():
                    flat[f"{name}.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        return flat

    def _load_optimizer_state(self, flat: dict[str, Tensor]) -> None:
        for name, opt in self.optimizers_.items():
            sd = opt.state_dict()
            state: dict[int, dict[str, Tensor]] = {}
            for k, value in flat.items():
                owner, pid, key = k.split(".", 2)
                if owner == name:
                    state.setdefault(int(pid), {})[key] = value
            sd["state"] = state
            opt.load_state_dict(sd)  # moves the moments to the parameters' device

    extra_meta_keys: ClassVar[tuple[str, ...]] = ()  # the keys `_meta_extra` writes (optional when loading)

    def _meta_extra(self) -> dict[str, Any]:
        """Fitted values a subclass keeps in model.json besides the common keys."""
        return {}

    def _load_meta_extra(self, meta: dict[str, Any], meta_file: Path) -> None:
        """Read back what `_meta_extra` wrote (LoadError naming `meta_file` when it is malformed)."""

    def save(self, path: str | Path) -> None:
        """Write `path/weights.safetensors`, `path/optimizer.safetensors` (to resume training) and
        `path/model.json` as one folder, atomically (see `anomalab.detector.write_saved_folder`): `path`
        holds the old model or the new one, never a mix; other files of an earlier saved model there are
        kept, and a folder that holds files but no model.json is refused with a RunFolderError."""
        self._check_fitted()
        weights = nets_state(self._nets())
        optimizer_state = self._optimizer_state()  # empty when not trained yet: no file then
        meta = {"format_version": FORMAT_VERSION, "anomalab_version": __version__, "name": self.name,
                "params": self.get_params(), "steps_done": self.steps_done_, "history": self.history_,
                **self._meta_extra()}
        text = json.dumps(meta, indent=1)

        def write(folder: Path) -> None:
            save_file(weights, str(folder / WEIGHTS_FILE))
            if optimizer_state:
                save_file(optimizer_state, str(folder / OPTIMIZER_FILE))
            (folder / META_FILE).write_text(text)

        write_saved_folder(path, META_FILE, write, own=(WEIGHTS_FILE, OPTIMIZER_FILE, META_FILE), what="model")

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> LatentModel:
        """The model saved in `path` (on `device` if given). Like a detector's load, every file is checked
        first; each problem is a one-line LoadError naming the file."""
        path = Path(path)
        meta = read_meta(path, META_FILE, keys=MODEL_KEYS + cls.extra_meta_keys)
        meta_file, weights_file, optimizer_file = path / META_FILE, path / WEIGHTS_FILE, path / OPTIMIZER_FILE
        if meta["name"] != cls.name:
            raise LoadError(f"{path} holds a '{meta['name']}' model, not '{cls.name}'")
        params = dict(meta["params"])
        if device is not None:
            params["device"] = device
        try:
            params = validate(cls, params, owner=cls.name)
        except ParameterError as e:
            raise LoadError(f"{meta_file}: {e}") from None
        steps = meta.get("steps_done", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise LoadError(f"{meta_file}: steps_done must be an integer >= 0, got {steps!r}")
        history = meta.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise LoadError(f"{meta_file}: history must be a list of JSON objects")
        weights = read_tensors(weights_file)
        optimizer_state = read_tensors(optimizer_file) if optimizer_file.is_file() else None
        model = cls(**params)
        model._start()
        nets = model._nets()
        stray = sorted(k for k in weights if not any(k.startswith(f"{n}.") for n in nets))
        if stray:
            raise LoadError(f"{weights_file}: unexpected tensor(s) for {cls.name}: {', '.join(stray[:3])}")
        try:
            load_nets_state(nets, weights, model.device_, f"{weights_file} ({cls.name})")
        except LoadError:
            raise
        except RuntimeError as e:  # shapes that do not fit the networks built from the params
            reason = str(e).strip().splitlines()[-1].strip()
            raise LoadError(f"{weights_file}: weights do not fit {cls.name}: {reason}") from None
        model.steps_done_ = steps
        model.history_ = list(history)
        model._load_meta_extra(meta, meta_file)
        if optimizer_state is not None:  # folders saved before it existed resume with fresh moments
            owners = {k for k, v in vars(model).items() if isinstance(v, torch.optim.Optimizer)}
            bad = sorted(k for k in optimizer_state
                         if k.count(".") < 2 or k.split(".")[0] not in owners or not k.split(".")[1].isdigit())
            if bad:
                raise LoadError(f"{optimizer_file}: unexpected tensor(s) for {cls.name}: {', '.join(bad[:3])}")
            try:
                model._load_optimizer_state(optimizer_state)
            except (ValueError, KeyError, IndexError, RuntimeError) as e:
                raise LoadError(f"{optimizer_file}: optimiser state does not fit {cls.name}: {e}") from None
        return model
