"""Shared procedure of reconstruction-based detectors (conv_ae, vae): one loss minimised by one Adam
through `train_more` (`anomalab.train.epochs`), score = mean squared reconstruction error, map =
per-pixel absolute residual."""

from __future__ import annotations

import torch
from torch import Tensor

from anomalab.detector import BaseDetector
from anomalab.nets.conv28 import model_size
from anomalab.train.epochs import EpochTrained
from anomalab.types import ImageSet


class ReconstructionDetector(EpochTrained, BaseDetector):
    """One loss (`loss(batch)`), one optimiser `optimizers_["model"]` over every net's parameters: a
    continual strategy may extend the batch (replay), add to the loss (ewc) or change the data."""

    onnx_exportable = True
    continual_strategies = ("finetune", "joint", "ewc")
    distributable = True  # losses are means over the batch's images (anomalab.distributed)

    def _model_shape(self, data_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = data_shape
        side = model_size(max(h, w))  # the conv28 nets are square: a non-square image is resized to a square
        return (c, side, side)

    # subclasses: _build (sets self.encoder_, self.decoder_), loss(batch), _reconstruct(x)
    def _nets(self):
        return {"encoder": self.encoder_, "decoder": self.decoder_}

    def loss(self, batch: Tensor) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def _reconstruct(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = [p for net in self._nets().values() for p in net.parameters()]
        return {"model": torch.optim.Adam(params, lr=self.lr)}

    def _train_step(self, batch: Tensor) -> dict[str, float]:
        opt = self.optimizers_["model"]
        opt.zero_grad(set_to_none=True)
        loss, logs = self.loss(batch.to(self.device_, non_blocking=True))
        loss.backward()
        opt.step()
        return logs

    def _fit(self, x: Tensor, train: ImageSet) -> None:
        self.train_more(x)

    def _build(self, shape):
        self.reset_optimizers()
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
