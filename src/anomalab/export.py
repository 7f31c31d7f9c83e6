"""ONNX export of a fitted detector's scoring, and a scorer that runs it with onnxruntime.

The exported graph takes images already at the detector's working shape (N, C, H, W) in [0, 1] and
returns (scores (N,), maps (N, h, w)); `OnnxScorer` does the same conversion as `score` before calling
it, so its scores match the detector's. Detectors whose `_score_batch`/`_map_batch` are traceable tensor
code opt in with the class attribute `onnx_exportable = True`.
Needs the optional extra: `pip install anomalab[onnx]` (onnx, onnxruntime).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from anomalab.data.transforms import check_images, prepare

ONNX_META = "onnx.json"


class _ScoreAndMap(nn.Module):
    """Wraps a detector's batch functions so the exporter traces them."""

    def __init__(self, det):
        super().__init__()
        self.det = det
        self.nets = nn.ModuleDict(det._nets())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.det._score_batch(x), self.det._map_batch(x)


def export_onnx(det, path: str | Path, opset: int = 17) -> Path:
    """Write `path` (.onnx) and `onnx.json` beside it (name, input shape, threshold)."""
    det._check_fitted()
    if not getattr(det, "onnx_exportable", False):
        raise NotImplementedError(f"{det.name} cannot be exported to ONNX yet")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _ScoreAndMap(det).eval().cpu()
    example = torch.rand(2, *det.input_shape_)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=["scores", "maps"],
                          dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}, "maps": {0: "n"}},
                          opset_version=opset, dynamo=False)
    meta = {"name": det.name, "input_shape": list(det.input_shape_), "params": det.get_params(),
            "threshold": None if det.threshold_ is None else det.threshold_.to_dict(), "onnx": path.name}
    (path.parent / ONNX_META).write_text(json.dumps(meta, indent=1, default=str))
    return path


class OnnxScorer:
    """Score images with an exported detector on onnxruntime: `OnnxScorer("model.onnx").score(images)`."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        self.meta = json.loads((path.parent / ONNX_META).read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_shape = tuple(self.meta["input_shape"])

    def run(self, images: Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        check_images(images, what="onnx score")
        scores, maps = [], []
        for i in range(0, len(images), batch_size):
            x = prepare(images[i : i + batch_size], self.input_shape).numpy()
            s, m = self.session.run(None, {"images": x})
            scores.append(s)
            maps.append(m)
        return np.concatenate(scores), np.concatenate(maps)

    def score(self, images: Tensor, batch_size: int = 256) -> np.ndarray:
        """(N,) scores, higher = more anomalous (maps at the model's resolution from `run`)."""
        return self.run(images, batch_size)[0]
