"""ONNX export of a fitted detector's scoring, and a scorer that runs it with onnxruntime and numpy alone.

The exported graph takes images already at the detector's working shape (N, C, H, W) in [0, 1], float32,
any N, and returns `scores` (N,) and, where the detector's map is a fixed graph, `maps` (N, h, w) at the
model's resolution. A detector opts in with the class attribute `onnx_exportable = True`; the graph is
traced from its `_onnx_forward(x, maps)` where it has one (scores and maps in one pass, written with
static shapes), else from `_score_batch` and `_map_batch`. A detector that cannot be exported says why in
`onnx_refusal` (e.g. anogan, which optimises a latent code per image); one whose map is not a fixed graph
says why in `onnx_no_maps` (metric: Grad-CAM), and its model has scores only (`maps: false`).

The model carries its metadata under the key "anomalab" (name, anomalab version, input shape, params,
threshold, whether it has maps, the preprocessing to replicate), written also as `<model>.onnx.json`.

`OnnxScorer` needs only numpy and onnxruntime (this module imports torch only to export): it checks and
converts images as `anomalab.data.transforms.prepare` does (`prepare_array`, numpy), so its scores are the
detector's to float32 rounding (tests/test_export.py holds the per-detector tolerances). Install:
`pip install anomalab[onnx]` to export; `pip install onnxruntime numpy` where the model only runs.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from anomalab.errors import DataError, ImageTypeError, LoadError, NotSupportedError

META_KEY = "anomalab"  # key of the metadata record inside the ONNX model
OPSET = 17
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # RGB -> gray, as anomalab.data.transforms
PREPROCESSING = {
    "input": "(N, C, H, W) float32 in [0, 1] at input_shape",
    "channels": "gray -> RGB: the gray channel repeated; RGB -> gray: 0.299 R + 0.587 G + 0.114 B",
    "resize": "bilinear, align_corners=False (half-pixel centres), antialiased (triangle filter widened by the "
              "scale) when either side shrinks, then clipped to [0, 1]; none at the same size",
    "maps": "at the model's resolution; bilinear without antialiasing to bring them to an image's own size",
}


def meta_path(path: str | Path) -> Path:
    """The JSON copy of a model's metadata, named after the model: model.onnx -> model.onnx.json."""
    path = Path(path)
    return path.with_name(path.name + ".json")


# ---- export --------------------------------------------------------------------------------------------
def _maps_note(det, example) -> str | None:
    """None when the detector's map exports as a fixed graph, else the reason it does not."""
    import torch

    note = getattr(det, "onnx_no_maps", None)
    if note:
        return f"{det.name} gives no maps in ONNX: {note}"
    try:
        with torch.no_grad():
            det._map_batch(example)
    except NotImplementedError as e:
        return str(e)
    return None


def _graph(det, maps: bool):
    """The nn.Module the exporter traces: images -> (scores,) or (scores, maps), float32."""
    import torch
    from torch import nn

    class ScoreAndMap(nn.Module):
        def __init__(self):
            super().__init__()
            self.nets = nn.ModuleDict(det._nets())

        def forward(self, x):
            hook = getattr(det, "_onnx_forward", None)
            if hook is not None:
                scores, amap = hook(x, maps)
            else:
                scores, amap = det._score_batch(x), det._map_batch(x) if maps else None
            scores = scores.to(torch.float32)
            return (scores,) if amap is None else (scores, amap.to(torch.float32))

    return ScoreAndMap()


def refusal(det) -> str | None:
    """The sentence saying why `det` cannot be exported to ONNX, or None when it can."""
    reason = getattr(det, "onnx_refusal", None)
    if reason:
        return reason
    if not getattr(det, "onnx_exportable", False):
        return f"{det.name or type(det).__name__} cannot be exported to ONNX: its scoring is not a fixed graph"
    return None


def export_onnx(det, path: str | Path, opset: int = OPSET) -> Path:
    """Write `path` (.onnx) with the detector's metadata inside the model (key "anomalab") and as
    `<path>.json` beside it. A detector that cannot be exported is a NotSupportedError saying why, before
    anything is written. Both files are written through temporary siblings and renamed, so a failed export
    leaves no half file. The graph is checked at batch sizes other than the traced one."""
    reason = refusal(det)
    if reason:
        raise NotSupportedError(reason)
    det._check_fitted()
    import onnx
    import torch

    from anomalab._version import __version__
    from anomalab.runs.atomic import atomic_file, write_file_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for net in det._nets().values():
        net.eval().cpu()
    example = torch.rand(2, *det.input_shape_, generator=torch.Generator().manual_seed(0))
    note = _maps_note(det, example)
    maps = note is None
    module = _graph(det, maps).eval()
    outputs = ["scores", "maps"] if maps else ["scores"]
    with torch.no_grad():
        map_shape = list(module(example[:1])[1].shape[1:]) if maps else None
    meta: dict[str, Any] = {
        "name": det.name, "anomalab_version": __version__, "input_shape": list(det.input_shape_),
        "params": det.get_params(), "threshold": None if det.threshold_ is None else det.threshold_.to_dict(),
        "onnx": path.name, "opset": opset, "outputs": outputs, "maps": maps, "map_shape": map_shape,
        "preprocessing": PREPROCESSING}
    if note:
        meta["maps_note"] = note
    text = json.dumps(meta, indent=1, default=str)
    with atomic_file(path) as tmp:  # the model lands whole and checked, or not at all
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer chatter; the batch-size check below is what counts
            torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=outputs,
                              dynamic_axes={name: {0: "n"} for name in ["images", *outputs]},
                              opset_version=opset, dynamo=False)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {META_KEY: text})
        onnx.save(model, str(tmp))
        _check_batch_sizes(tmp, det.input_shape_, det.name)
    write_file_atomic(meta_path(path), text + "\n")
    return path


def _check_batch_sizes(path: Path, shape, name: str) -> None:
    """Run the graph at batch sizes 1 and 3 (it was traced at 2): a size fixed by the trace fails here."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = np.random.default_rng(n).random((n, *shape), dtype=np.float32)
        try:
            out = session.run(None, {"images": x})
        except Exception as e:  # onnxruntime raises its own exception types
            raise RuntimeError(f"the ONNX graph of {name} fails at batch size {n}: {e}") from None
        if out[0].shape != (n,):
            raise RuntimeError(f"the ONNX graph of {name} gives scores of shape {out[0].shape} for {n} images")


# ---- preprocessing in numpy (what prepare does) -----------------------------------------------------------
def check_array(images: Any, what: str = "onnx score") -> np.ndarray:
    """`images` as a float32 (N, C, H, W) array, or the one-line DataError `check_images` gives (shape,
    channels, NaN, range); a torch tensor is converted, a list or a file name is an ImageTypeError."""
    if hasattr(images, "detach") and hasattr(images, "numpy"):  # a torch tensor, without importing torch
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise ImageTypeError(f"{what}: expected an array of shape (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise DataError(f"{what}: expected images of shape (N, C, H, W) in [0, 1], got {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise DataError(f"{what}: expected 1 (gray) or 3 (RGB) channels, got {images.shape[1]} "
                        f"in shape {tuple(images.shape)}")
    images = images.astype(np.float32, copy=False)
    if images.size:
        lo, hi = float(images.min()), float(images.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DataError(f"{what}: images contain NaN or infinite values")
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(f"{what}: expected values in [0, 1], got [{lo:.3g}, {hi:.3g}]")
    return images


def _axis_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """(n_out, n_in) weights of torch's bilinear interpolation along one axis (align_corners=False), with
    its antialiasing filter when asked (the triangle widened by the scale when shrinking)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    if antialias:
        support = scale if scale >= 1.0 else 1.0
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(n_out):
            centre = scale * (i + 0.5)
            lo = max(int(centre - support + 0.5), 0)
            hi = min(int(centre + support + 0.5), n_in)
            j = np.arange(lo, hi)
            taps = np.clip(1.0 - np.abs((j - centre + 0.5) * inv), 0.0, None)
            if taps.sum() > 0:
                w[i, lo:hi] = taps / taps.sum()
        return w
    for i in range(n_out):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        frac = src - i0
        w[i, i0] += 1.0 - frac
        w[i, i1] += frac
    return w


def resize_array(x: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """(..., H, W) -> (..., h, w) by the weights of `_axis_weights`, computed in float64, returned as float32."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    out = _axis_weights(h, size[0], antialias) @ x.astype(np.float64) @ _axis_weights(w, size[1], antialias).T
    return out.astype(np.float32)


def prepare_array(images: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] -> contiguous float32 at the model's (C, H, W): what
    `anomalab.data.transforms.prepare` does, in numpy (channels converted, then bilinear resizing,
    antialiased when shrinking, clipped to [0, 1])."""
    x = check_array(images)
    c, h, w = (int(s) for s in shape)
    if x.shape[1] == 1 and c == 3:
        x = np.repeat(x, 3, axis=1)
    elif x.shape[1] == 3 and c == 1:
        x = (x * LUMA[None, :, None, None]).sum(1, keepdims=True, dtype=np.float32)
    if tuple(x.shape[-2:]) != (h, w):
        shrinking = x.shape[-2] > h or x.shape[-1] > w
        x = np.clip(resize_array(x, (h, w), antialias=shrinking), 0.0, 1.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def resize_map_array(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) maps -> (N, H, W), bilinear without antialiasing (as `anomalab.data.transforms.resize_maps`)."""
    if tuple(maps.shape[-2:]) == tuple(size) or maps.size == 0:
        return maps
    return resize_array(maps, size, antialias=False)


# ---- scoring with onnxruntime --------------------------------------------------------------------------
class OnnxScorer:
    """Score images with an exported detector on onnxruntime: `OnnxScorer("model.onnx").score(images)`.

    Needs numpy and onnxruntime only. `meta` is the model's own metadata record; `maps` whether it gives
    maps; `threshold` the saved image threshold (None without one)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise LoadError(f"{path} has no anomalab metadata: export it with `anomalab export`")
        self.meta = json.loads(props[META_KEY])  # the model's own record, never a file that another export shares
        self.input_shape = tuple(int(s) for s in self.meta["input_shape"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.maps = "maps" in self.outputs

    @property
    def threshold(self) -> float | None:
        """The image threshold saved with the detector (a score above it is anomalous), or None."""
        thr = self.meta.get("threshold")
        return None if not thr else float(thr["value"])

    def run_prepared(self, x: np.ndarray, maps: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """One batch already at the model's shape (float32) -> (scores (N,), maps (N, h, w) or None)."""
        want = self.outputs if (maps and self.maps) else ["scores"]
        out = self.session.run(want, {"images": np.ascontiguousarray(x, dtype=np.float32)})
        return out[0], (out[1] if len(out) > 1 else None)

    def run(self, images: Any, batch_size: int = 256, maps: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """images (N, C, H, W) in [0, 1] -> (scores (N,), maps (N, h, w) at the model's resolution, or None
        for a model without maps or with maps=False)."""
        images = check_array(images)
        scores, all_maps = [], []
        for i in range(0, len(images), batch_size):
            s, m = self.run_prepared(prepare_array(images[i : i + batch_size], self.input_shape), maps)
            scores.append(s)
            all_maps.append(m)
        if not scores:
            return np.empty(0, np.float32), None
        return np.concatenate(scores), (np.concatenate(all_maps) if all_maps[0] is not None else None)

    def score(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """(N,) scores, higher = more anomalous."""
        return self.run(images, batch_size, maps=False)[0]

    def score_map(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """(N, H, W) anomaly maps at the images' own resolution; NotSupportedError for a model without maps."""
        if not self.maps:
            raise NotSupportedError(self.meta.get("maps_note") or f"{self.meta.get('name')} gives no maps in ONNX")
        images = check_array(images)
        return resize_map_array(self.run(images, batch_size)[1], tuple(images.shape[-2:]))
