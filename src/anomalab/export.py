"""ONNX export of a fitted detector's scoring, and a scorer that runs it with onnxruntime.

The exported graph takes images already at the detector's working shape (N, C, H, W) in [0, 1] and
returns (scores (N,), maps (N, h, w)); `OnnxScorer` does the same conversion as `score` before calling
it, so its scores match the detector's. Detectors whose `_score_batch`/`_map_batch` are traceable tensor
code opt in with the class attribute `onnx_exportable = True`.
Needs the optional extra: `pip install anomalab[onnx]` (onnx, onnxruntime).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from anomalab.data.transforms import check_images, prepare
from anomalab.errors import LoadError, NotSupportedError

META_KEY = "anomalab"  # key of the metadata (name, version, input shape, threshold) inside the ONNX model


def meta_path(path: str | Path) -> Path:
    """The JSON copy of a model's metadata, named after the model: model.onnx -> model.onnx.json."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class _ScoreAndMap(nn.Module):
    """Wraps a detector's batch functions so the exporter traces them."""

    def __init__(self, det):
        super().__init__()
        self.det = det
        self.nets = nn.ModuleDict(det._nets())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.det._score_batch(x), self.det._map_batch(x)


def export_onnx(det, path: str | Path, opset: int = 17) -> Path:
    """Write `path` (.onnx) with the detector's name, anomalab version, input shape, params and threshold in
    the model's own metadata (key "anomalab"), and the same record as `<path>.json` beside it for people.
    Both files are written through temporary siblings and renamed, so a failed export leaves no half file."""
    import onnx

    from anomalab._version import __version__
    from anomalab.runs.atomic import temp_sibling, write_file_atomic

    det._check_fitted()
    if not getattr(det, "onnx_exportable", False):
        raise NotSupportedError(f"{det.name} cannot be exported to ONNX yet (exportable: conv_ae, vae, knn, pca)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _ScoreAndMap(det).eval().cpu()
    example = torch.rand(2, *det.input_shape_)
    meta = {"name": det.name, "anomalab_version": __version__, "input_shape": list(det.input_shape_),
            "params": det.get_params(), "threshold": None if det.threshold_ is None else det.threshold_.to_dict(),
            "onnx": path.name}
    text = json.dumps(meta, indent=1, default=str)
    tmp = temp_sibling(path)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=["scores", "maps"],
                              dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}, "maps": {0: "n"}},
                              opset_version=opset, dynamo=False)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {META_KEY: text})
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_file_atomic(meta_path(path), text + "\n")
    return path


class OnnxScorer:
    """Score images with an exported detector on onnxruntime: `OnnxScorer("model.onnx").score(images)`."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise LoadError(f"{path} has no anomalab metadata: export it with `anomalab export`")
        self.meta = json.loads(props[META_KEY])  # the model's own record, never a file that another export shares
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
