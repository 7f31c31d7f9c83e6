"""What the teacher and the student share: parameters, step-based training on rendered batches,
encoding, and save/load as a folder of `weights.safetensors` + `model.json` (no pickle)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from anomalab import __version__
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
)
from anomalab.train.loop import run_epochs

META_FILE = "model.json"  # beside weights.safetensors; checked like detector.json (format, version)
# the optimisers' state (Adam moments and step counts), so that training resumed from a saved folder in a new
# process continues exactly as an uncut run would (without it Adam restarts from zero moments)
OPTIMIZER_FILE = "optimizer.safetensors"


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
    in `_build()`, list them in `_nets()`, and implement `_train_step(batch)` and `_draw(rng)`."""

    name: ClassVar[str] = ""
    channels: ClassVar[int] = 1
    log_every: ClassVar[int] = 100
    progress: bool = True

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
    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}

    def _optimizer_state(self) -> dict[str, Tensor]:
        """The optimisers' per-parameter state as flat tensors '{optimizer}.{param index}.{key}'
        (hyper-parameters are rebuilt from the model's params, so only the tensors are kept)."""
        flat = {}
        for name, opt in self._optimizers().items():
            for pid, state in opt.state_dict()["state"].items():
                for key, value in state.items():
                    flat[f"{name}.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        return flat

    def _load_optimizer_state(self, flat: dict[str, Tensor]) -> None:
        for name, opt in self._optimizers().items():
            sd = opt.state_dict()
            state: dict[int, dict[str, Tensor]] = {}
            for k, value in flat.items():
                owner, pid, key = k.split(".", 2)
                if owner == name:
                    state.setdefault(int(pid), {})[key] = value
            sd["state"] = state
            opt.load_state_dict(sd)  # moves the moments to the parameters' device

    def save(self, path: str | Path) -> None:
        """Write `path/weights.safetensors`, `path/optimizer.safetensors` (to resume training) and
        `path/model.json`."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(nets_state(self._nets()), str(path / WEIGHTS_FILE))
        optimizer_state = self._optimizer_state()
        if optimizer_state:
            save_file(optimizer_state, str(path / OPTIMIZER_FILE))
        else:  # not trained yet: no moments, and none left over from a model saved here before
            (path / OPTIMIZER_FILE).unlink(missing_ok=True)
        meta = {"format_version": FORMAT_VERSION, "anomalab_version": __version__, "name": self.name,
                "params": self.get_params(), "steps_done": self.steps_done_, "history": self.history_}
        (path / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> LatentModel:
        path = Path(path)
        meta = read_meta(path, META_FILE)
        if meta.get("name") != cls.name:
            raise LoadError(f"{path} holds a '{meta.get('name')}' model, not '{cls.name}'")
        params = dict(meta["params"])
        if device is not None:
            params["device"] = device
        model = cls(**params)
        model._start()
        load_nets_state(model._nets(), load_file(str(path / WEIGHTS_FILE)), model.device_,
                        f"{path / WEIGHTS_FILE} ({cls.name})")
        model.steps_done_ = int(meta.get("steps_done", 0))
        model.history_ = list(meta.get("history", []))
        if (path / OPTIMIZER_FILE).is_file():  # folders saved before it existed resume with fresh moments
            model._load_optimizer_state(load_file(str(path / OPTIMIZER_FILE)))
        return model
