"""The served run: its detector (torch, or ONNX Runtime on the run's detector exported at start-up), how an
uploaded file becomes a prepared image, how a batch is scored, and the overlays.

Uploads are checked as files are everywhere else: the header first (a format anomalab reads, at most
`anomalab.data.folder.MAX_PIXELS` pixels, checked before anything is decoded), then
`anomalab.data.folder.read_image` with the detector's channel count and
`anomalab.data.transforms.prepare` (or its numpy twin for ONNX), exactly as `anomalab score` reads a
file. A rejected upload is a `Rejected` carrying the HTTP status and a message naming the file.
"""

from __future__ import annotations

import base64
import io
import os
import platform
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomalab import scoring
from anomalab.data import folder
from anomalab.data.transforms import prepare
from anomalab.errors import DataError, DataNotFoundError
from anomalab.predict import ColourScale, colour_bar, overlay

FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM")  # what read_image is meant for (IMAGE_SUFFIXES)
MAX_OVERLAY_SIDE = 1024  # overlays larger than this (either side) are sent downscaled
_HEADER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)


class Rejected(Exception):
    """An upload the server refuses: `status` (400, 413, 415) and a message naming the file."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def clean_name(name: str | None, index: int) -> str:
    """The upload's file name as a label only: its last path component, printable, at most 200 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()[:200]
    return base or f"image-{index + 1}"


def _png_base64(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ServedModel:
    """A run folder's detector ready to score uploads. engine "torch" scores with the saved detector;
    "onnx" exports it at start-up into a private temporary folder and scores with `OnnxScorer`.
    Every batch has exactly `batch_size` rows (`anomalab.scoring.SCORE_BATCH` by default, as `anomalab
    score`), so with the torch engine a served score equals `anomalab score`'s for the same file."""

    def __init__(self, run_dir: str | Path, onnx: bool = False, batch_size: int = scoring.SCORE_BATCH,
                 threads: int | None = None, max_overlay_side: int = MAX_OVERLAY_SIDE):
        from anomalab.registry import load
        from anomalab.thresholds import gives_maps, read_calibration

        self.run_dir = Path(run_dir)
        self.det = load(self.run_dir)
        if getattr(self.det, "tiling", None) is not None:
            from anomalab.errors import NotSupportedError

            raise NotSupportedError(f"{self.run_dir} is a tiled run (--tile {self.det.tile}): serve scores every "
                                    "upload at the model's input size; score tiled runs with `anomalab score` "
                                    "or `anomalab predict`")
        self.threshold = self.det.threshold_
        self.shape = tuple(int(s) for s in self.det.input_shape_)
        self.batch_size = int(batch_size)
        self.max_overlay_side = int(max_overlay_side)
        self.engine = "onnx" if onnx else "torch"
        self._tmp = Path(tempfile.mkdtemp(prefix="anomalab-serve-"))
        self.scorer = None
        self.notes: list[str] = []
        try:
            if onnx:
                from anomalab.export import OnnxScorer, export_onnx

                self.scorer = OnnxScorer(export_onnx(self.det, self._tmp / "model.onnx"), threads=threads)
                self.maps = self.scorer.maps
            else:
                self.maps = gives_maps(self.det)
        except BaseException:
            self.close()
            raise
        self.scale = None
        if not self.maps:
            self.notes.append(f"{self.det.name} gives no anomaly maps here ({self.engine}): no overlays")
        elif self.threshold is None or self.threshold.pixel_value is None:
            self.notes.append("the run has no pixel threshold: no overlays (set one with `anomalab threshold`)")
        else:
            run = self.run_dir
            home = run if (run / "detector").is_dir() or run.name != "detector" else run.parent
            level = ((read_calibration(home) or {}).get("maps") or {}).get("level")
            self.scale = ColourScale.for_run(self.threshold.pixel_value, level)
        if self.threshold is None:
            self.notes.append("the run has no threshold: scores only, no verdicts")

    @property
    def overlays(self) -> bool:
        return self.scale is not None

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ---- uploads ------------------------------------------------------------------------------------
    def decode(self, data: bytes, name: str) -> tuple[np.ndarray, Any]:
        """(image (C, H, W) float32 at its own size, prepared image at the model's shape) of one upload."""
        if not data:
            raise Rejected(400, f"{name}: the file is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                    w, h = im.size
        except Image.DecompressionBombError as e:
            raise Rejected(413, f"{name}: {e}") from None
        except _HEADER_ERRORS:
            raise Rejected(415, f"{name} is not an image anomalab reads "
                                "(PNG, JPEG, BMP, TIFF, WebP, PGM/PPM)") from None
        limit = folder.MAX_PIXELS
        if w * h > limit:
            raise Rejected(413, f"{name}: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the limit of "
                                f"{limit / 1e6:g} (anomalab.data.folder.MAX_PIXELS)")
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            image = folder.read_image(tmp, channels=self.shape[0])
        except (DataError, DataNotFoundError) as e:
            raise Rejected(400, str(e).replace(f"image {tmp}", name).replace(tmp, name)) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        if self.scorer is not None:
            from anomalab.export import prepare_array

            return image, prepare_array(image[None], self.shape)[0]
        return image, prepare(torch.from_numpy(image)[None], self.shape)[0]

    # ---- scoring (called by the batcher's worker thread) ----------------------------------------------
    def stack(self, items: list) -> Any:
        return np.stack(items) if self.scorer is not None else torch.stack(items)

    def pad(self, batch: Any, n: int) -> Any:
        if self.scorer is not None:
            return np.concatenate([batch, np.zeros((n, *batch.shape[1:]), dtype=batch.dtype)])
        return torch.cat([batch, torch.zeros((n, *batch.shape[1:]), dtype=batch.dtype)])

    def score_batch(self, batch: Any, maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """A batch of exactly batch_size prepared images -> (scores, maps at the model's resolution or None)."""
        maps = maps and self.overlays
        if self.scorer is not None:
            return self.scorer.run_prepared(batch, maps=maps)
        scores = self.det.score(batch, batch_size=self.batch_size).numpy()
        amaps = self.det.score_map(batch, batch_size=self.batch_size).numpy() if maps else None
        return scores, amaps

    # ---- results -----------------------------------------------------------------------------------
    def verdict(self, score: float) -> str | None:
        return None if self.threshold is None else scoring.verdict(self.det, score)

    def overlay_png(self, image: np.ndarray, amap: np.ndarray) -> str:
        """Base64 PNG of the image with its map on the run's colour scale (`anomalab.predict.overlay`), at
        the image's own size, or downscaled so that its longer side is max_overlay_side."""
        from anomalab.export import resize_array, resize_map_array

        h, w = image.shape[1:]
        size = (h, w)
        if max(h, w) > self.max_overlay_side:
            f = self.max_overlay_side / max(h, w)
            size = (max(1, round(h * f)), max(1, round(w * f)))
            image = np.clip(resize_array(image, size, antialias=True), 0.0, 1.0)
        amap = resize_map_array(np.asarray(amap, dtype=np.float32)[None], size)[0]
        return _png_base64(overlay(image, amap, self.scale))

    def describe(self) -> dict[str, Any]:
        """What GET /v1/model returns (the app adds the web stack's versions and its limits)."""
        from anomalab._version import __version__

        versions = {"anomalab": __version__, "python": platform.python_version(), "torch": torch.__version__,
                    "numpy": np.__version__}
        if self.scorer is not None:
            import onnxruntime

            versions["onnxruntime"] = onnxruntime.__version__
        return {
            "detector": self.det.name, "params": self.det.get_params(), "input_shape": list(self.shape),
            "threshold": None if self.threshold is None else self.threshold.to_dict(), "engine": self.engine,
            "maps": self.maps, "overlays": self.overlays, "batch_size": self.batch_size,
            "colour_scale": None if self.scale is None else self.scale.to_dict(),
            "colour_bar": None if self.scale is None else base64.b64encode(colour_bar(self.scale)).decode("ascii"),
            "notes": self.notes, "versions": versions,
        }
