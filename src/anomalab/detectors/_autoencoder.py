"""Shared procedure of reconstruction-based detectors (conv_ae, vae): train with Adam through
`run_epochs`, score = mean squared reconstruction error, map = per-pixel absolute residual."""

from __future__ import annotations

import torch
from torch import Tensor

from anomalab.detector import BaseDetector
from anomalab.nets.conv28 import model_size
from anomalab.train.loop import Batches, run_epochs, seed_everything
from anomalab.types import ImageSet


class ReconstructionDetector(BaseDetector):
    progress: bool = True
    onnx_exportable = True

    def _model_shape(self, data_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = data_shape
        return (c, model_size(h), model_size(w))

    # subclasses: _build (sets self.encoder_, self.decoder_), loss(batch), _reconstruct(x)
    def _nets(self):
        return {"encoder": self.encoder_, "decoder": self.decoder_}

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def _reconstruct(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _train_step(self, batch: Tensor) -> dict[str, float]:
        self.optimizer_.zero_grad(set_to_none=True)
        loss, logs = self.loss(batch.to(self.device_, non_blocking=True))
        loss.backward()
        self.optimizer_.step()
        return logs

    def _fit(self, x: Tensor, train: ImageSet) -> None:
        self.train_more(x)

    def train_more(self, x: Tensor, epochs: int | None = None, step=None, desc: str | None = None) -> None:
        """Train the current networks further on prepared images x (N, C, H, W); used by `fit` and by
        continual learning. `step` replaces `_train_step` (a strategy wrapping it)."""
        generator = seed_everything(self.seed + len(self.history_))
        for net in self._nets().values():
            net.train()
        if getattr(self, "optimizer_", None) is None:
            params = [p for net in self._nets().values() for p in net.parameters()]
            self.optimizer_ = torch.optim.Adam(params, lr=self.lr)
        loader = Batches(x, self.batch_size, shuffle=True, generator=generator)
        self.history_ += run_epochs(step or self._train_step, loader, epochs or self.epochs,
                                    progress=self.progress, desc=desc or f"{self.name} fit")

    def _build(self, shape):
        self.optimizer_ = None
        torch.manual_seed(self.seed)
        self._make_nets(shape)
        for net in self._nets().values():
            net.to(self.device_)

    def _make_nets(self, shape) -> None:
        raise NotImplementedError

    def _score_batch(self, x: Tensor) -> Tensor:
        return (x - self._reconstruct(x)).pow(2).flatten(1).mean(1)

    def _map_batch(self, x: Tensor) -> Tensor:
        return (x - self._reconstruct(x)).abs().mean(1)

    def reconstruct(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        """images (N, C, H, W) in [0, 1] -> reconstructions (N, C', H', W') at the model's shape."""
        return self._batched(self._reconstruct, images, batch_size)
