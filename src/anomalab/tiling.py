"""Scoring large and non-square images at full resolution, with overlapping tiles (docs/tiling.md).

A tiled detector cuts every image into `tile` x `tile` tiles on a regular grid with `overlap` pixels in
common between neighbours (`tile_grid`): the first tile of each row and column starts at the border, the
next ones `tile - overlap` further on, and the last one is shifted back to end exactly at the border, so
every tile is full-size, every pixel is covered and a non-square image stays non-square. An image smaller
than a tile (in height or width) is refused with a DataError: it is never padded or upscaled.

- fit: the wrapped detector is fitted on the tiles of the training images (all tiles of every image).
- image score: the maximum of its tiles' scores.
- anomaly map: each tile's map (at tile resolution) is placed at its position and the overlaps averaged
  (`stitch`; sums in float64, so a pixel covered by tiles that agree gets exactly their value back). The map
  has the image's own (H, W).
- tiles stream: an image's tiles are cut and scored `batch_size` at a time (the last batch padded with
  blank tiles, so an image's score depends on that image alone), never all at once.

`TiledDetector(detector, tile, overlap)` wraps any fitted-or-not detector with this procedure and is used
wherever a detector is (fit, thresholds, evaluation, `anomalab score` / `predict`); saved, it writes the
wrapped detector's folder plus `tiling.json`, which `anomalab.registry.load` reads back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomalab.data.transforms import check_images
from anomalab.errors import DataError, LoadError, ParameterError
from anomalab.types import ImageSet

log = logging.getLogger(__name__)

TILING_FILE = "tiling.json"
TILE_BATCH = 32  # tiles per detector call (as anomalab.scoring.SCORE_BATCH): part of what a score depends on

__all__ = ["TILE_BATCH", "TILING_FILE", "Stitcher", "TiledDetector", "check_tiling", "stitch", "tile_grid",
           "tile_starts", "tiles"]


def check_tiling(tile: Any, overlap: Any = 0) -> tuple[int, int]:
    """(tile, overlap) as ints, or a ParameterError: tile a positive integer, 0 <= overlap < tile."""
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ParameterError(f"tile must be a positive integer (pixels), got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise ParameterError(f"overlap must be an integer >= 0 (pixels), got {overlap!r}")
    if overlap >= tile:
        raise ParameterError(f"overlap must be smaller than the tile: overlap {overlap} >= tile {tile}")
    return int(tile), int(overlap)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of `length` pixels: 0, stride, 2 stride, ... with the last
    one at length - tile (stride = tile - overlap). A DataError when length < tile."""
    tile, overlap = check_tiling(tile, overlap)
    if length < tile:
        raise DataError(f"an image side of {length} pixels is smaller than the tile ({tile})")
    stride = tile - overlap
    n = -(-(length - tile) // stride) + 1  # ceil
    return [min(i * stride, length - tile) for i in range(n)]


def tile_grid(h: int, w: int, tile: int, overlap: int = 0) -> list[tuple[int, int]]:
    """(top, left) of every tile of an h x w image, row by row (module docstring). A DataError naming the
    image size when it is smaller than a tile; a ParameterError for a bad tile or overlap."""
    tile, overlap = check_tiling(tile, overlap)
    if h < tile or w < tile:
        raise DataError(f"a {h}x{w} (H x W) image is smaller than the {tile}x{tile} tile: use a tile of at most "
                        f"{min(h, w)} pixels (images are never padded or upscaled)")
    return [(top, left) for top in tile_starts(h, tile, overlap) for left in tile_starts(w, tile, overlap)]


def tiles(image: Tensor, tile: int, overlap: int = 0) -> Tensor:
    """(T, C, tile, tile): the tiles of one (C, H, W) image in `tile_grid` order (copies)."""
    grid = tile_grid(int(image.shape[-2]), int(image.shape[-1]), tile, overlap)
    return torch.stack([image[..., t : t + tile, s : s + tile] for t, s in grid]).contiguous()


class Stitcher:
    """Accumulates tile maps into one (H, W) map, overlaps averaged: add(maps, positions) batch by batch,
    then result(). Sums and counts are float64, so tiles that agree on a pixel give exactly their value."""

    def __init__(self, shape: tuple[int, int], tile: int) -> None:
        self.shape, self.tile = (int(shape[0]), int(shape[1])), int(tile)
        self.total = torch.zeros(self.shape, dtype=torch.float64)
        self.count = torch.zeros(self.shape, dtype=torch.float64)

    def add(self, maps: Tensor, positions: Sequence[tuple[int, int]]) -> None:
        if len(maps) != len(positions):
            raise ParameterError(f"{len(maps)} tile maps for {len(positions)} positions")
        t = self.tile
        for m, (top, left) in zip(maps, positions):
            if tuple(m.shape) != (t, t):
                raise ParameterError(f"a tile map must be {t}x{t}, got {tuple(m.shape)}")
            self.total[top : top + t, left : left + t] += m.double()
            self.count[top : top + t, left : left + t] += 1

    def result(self) -> Tensor:
        if bool((self.count == 0).any()):
            raise ParameterError("the tiles do not cover the whole image")
        return (self.total / self.count).float()


def stitch(maps: Tensor | Sequence[Tensor], grid: Sequence[tuple[int, int]], shape: tuple[int, int]) -> Tensor:
    """(H, W) = shape map from tile maps ((T, tile, tile), in `grid` order), overlaps averaged."""
    maps = torch.stack(list(maps)) if not isinstance(maps, Tensor) else maps
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        raise ParameterError(f"tile maps must be (T, tile, tile), got {tuple(maps.shape)}")
    out = Stitcher(shape, int(maps.shape[1]))
    out.add(maps, grid)
    return out.result()


def _batches(image: Tensor, grid: list[tuple[int, int]], tile: int, batch_size: int
             ) -> Iterator[tuple[Tensor, list[tuple[int, int]], int]]:
    """(batch of exactly batch_size tiles, their positions, number of real tiles): the last one padded blank."""
    for i in range(0, len(grid), batch_size):
        part = grid[i : i + batch_size]
        batch = torch.zeros((batch_size, image.shape[0], tile, tile), dtype=torch.float32)
        for j, (t, s) in enumerate(part):
            batch[j] = image[:, t : t + tile, s : s + tile]
        yield batch, part, len(part)


_NOT_DELEGATED = frozenset({"reconstruct", "embed", "sample", "generate"})  # whole-image methods of the inner


class TiledDetector:
    """A detector scoring images of any size >= tile at full resolution, tile by tile (module docstring).

    detector: the wrapped detector (e.g. `create("patchcore", image_size=64)`); it works on tiles, so a tile
    of its own input size keeps full resolution. Its name, parameters and threshold are the tiled
    detector's; `fit`, `score`, `score_map` take (N, C, H, W) tensors, or a list of (C, H, W) images of
    different sizes. batch_size: tiles per call of the wrapped detector."""

    onnx_exportable = False
    onnx_refusal = ("a tiled detector cannot be exported to ONNX: it scores a varying number of tiles per image; "
                    "score it with `anomalab score` or `anomalab predict`")

    def __init__(self, detector: Any, tile: int, overlap: int = 0, *, batch_size: int = TILE_BATCH) -> None:
        tile, overlap = check_tiling(tile, overlap)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
        object.__setattr__(self, "detector", detector)
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "overlap", overlap)
        object.__setattr__(self, "batch_size", batch_size)

    # ---- what the wrapped detector answers -----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in _NOT_DELEGATED or name == "detector":
            raise AttributeError(name)
        return getattr(self.detector, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("tile", "overlap", "batch_size", "detector"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.detector, name, value)  # threshold_, progress, epochs, ... belong to the wrapped detector

    def __repr__(self) -> str:
        return f"TiledDetector({self.detector!r}, tile={self.tile}, overlap={self.overlap})"

    @property
    def name(self) -> str:
        return self.detector.name

    def get_params(self) -> dict[str, Any]:
        return self.detector.get_params()

    def tiling(self) -> dict[str, int]:
        """{"tile": ..., "overlap": ...}, as run configs record it."""
        return {"tile": self.tile, "overlap": self.overlap}

    @property
    def is_fitted(self) -> bool:
        return getattr(self.detector, "input_shape_", None) is not None

    @property
    def input_shape_(self) -> tuple[int, int, int] | None:
        """(C, tile, tile): the channels the images are read with and the smallest image scored."""
        shape = getattr(self.detector, "input_shape_", None)
        return None if shape is None else (int(shape[0]), self.tile, self.tile)

    @property
    def score_batch_size(self) -> int:
        return self.batch_size

    # ---- fit / score ------------------------------------------------------------------------------------
    def _images(self, images: Any, what: str) -> list[Tensor]:
        if isinstance(images, ImageSet):
            images = images.images
        if isinstance(images, (list, tuple)):
            out = [check_images(x[None] if getattr(x, "ndim", 0) == 3 else x, what=what) for x in images]
            if any(len(x) != 1 for x in out):
                raise DataError(f"{what}: a list of images must hold (C, H, W) images")
            return [x[0].float() for x in out]
        images = check_images(images, what=what)
        return [x.float() for x in images]

    def fit(self, train: ImageSet | Tensor | Sequence[Tensor]) -> TiledDetector:
        """Fit the wrapped detector on every tile of the training images (a DataError for an image smaller
        than a tile, naming its size)."""
        images = self._images(train, f"{self.name}.fit")
        if not images:
            raise DataError(f"{self.name}.fit: no images to fit on")
        parts = [tiles(x, self.tile, self.overlap) for x in images]
        n = sum(len(p) for p in parts)
        log.info("%s: fitting on %d tiles of %dx%d (overlap %d) from %d images", self.name, n, self.tile,
                 self.tile, self.overlap, len(images))
        self.detector.fit(ImageSet(images=torch.cat(parts), meta={"name": "tiles"}))
        return self

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            from anomalab.errors import NotFittedError

            raise NotFittedError(f"{self.name} is not fitted: call fit(train) first")

    def score_image(self, image: Tensor, *, maps: bool = False, batch_size: int | None = None
                    ) -> tuple[float, Tensor | None]:
        """(score, map) of one (C, H, W) image: the max of its tiles' scores, and with maps=True its stitched
        (H, W) map (else None). Its tiles are scored `batch_size` at a time."""
        self._check_fitted()
        bs = batch_size or self.batch_size
        h, w = int(image.shape[-2]), int(image.shape[-1])
        grid = tile_grid(h, w, self.tile, self.overlap)
        best = -float("inf")
        stitcher = Stitcher((h, w), self.tile) if maps else None
        for batch, part, n in _batches(image, grid, self.tile, bs):
            best = max(best, float(self.detector.score(batch, batch_size=bs)[:n].max()))
            if stitcher is not None:
                try:
                    tile_maps = self.detector.score_map(batch, batch_size=bs)[:n]
                except NotImplementedError as e:
                    raise NotImplementedError(f"{self.name} gives no anomaly maps ({e}): a tiled {self.name} "
                                              "gives image scores only (the max over its tiles)") from None
                stitcher.add(tile_maps, part)
        return best, None if stitcher is None else stitcher.result()

    def score(self, images: Any, batch_size: int | None = None) -> Tensor:
        """(N,) scores: each image's maximum tile score."""
        return torch.tensor([self.score_image(x, batch_size=batch_size)[0]
                             for x in self._images(images, f"{self.name}.score")], dtype=torch.float32)

    def score_map(self, images: Any, batch_size: int | None = None) -> Tensor:
        """(N, H, W) stitched maps at the images' own resolution (a list of maps for a list of images of
        different sizes). NotImplementedError where the wrapped detector has no maps."""
        listed = isinstance(images, (list, tuple))
        maps = [self.score_image(x, maps=True, batch_size=batch_size)[1]
                for x in self._images(images, f"{self.name}.score_map")]
        if listed:
            return maps
        return torch.stack(maps) if maps else torch.empty(0)

    def fit_threshold(self, normal: ImageSet | Tensor, max_fpr: float = 0.01, *, pixel: bool = False,
                      basis: str = "normal"):
        """As `BaseDetector.fit_threshold`, on the tiled scores (each image's max over its tiles)."""
        from anomalab.thresholds import normal_statistics, threshold_from

        images = normal.images if isinstance(normal, ImageSet) else normal
        self.threshold_ = threshold_from(normal_statistics(self, images, maps=pixel), max_fpr, basis=basis)
        return self.threshold_

    # ---- save / load ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """The wrapped detector's folder plus tiling.json, written as one folder, atomically."""
        from anomalab.detector import META_FILE, write_saved_folder

        self._check_fitted()
        text = json.dumps({"format": 1, "tile": self.tile, "overlap": self.overlap,
                           "batch_size": self.batch_size}, indent=1)

        def write(folder: Path) -> None:
            self.detector.save(folder)
            (folder / TILING_FILE).write_text(text + "\n")

        write_saved_folder(path, META_FILE, write, own=(TILING_FILE,), what="detector")

    @classmethod
    def load(cls, path: str | Path) -> TiledDetector:
        """The tiled detector saved in `path` (a LoadError for a bad tiling.json)."""
        from anomalab.detector import read_meta
        from anomalab.registry import detector_class

        path = Path(path)
        spec = read_tiling(path)
        if spec is None:
            raise LoadError(f"{path} holds no {TILING_FILE}: not a tiled detector")
        inner = detector_class(read_meta(path)["name"]).load(path)
        return cls(inner, spec["tile"], spec["overlap"], batch_size=spec["batch_size"])


def read_tiling(path: str | Path) -> dict[str, int] | None:
    """The checked tiling.json of a saved detector folder, None when it has none; a LoadError when bad."""
    f = Path(path) / TILING_FILE
    if not f.is_file():
        return None
    try:
        spec = json.loads(f.read_text())
        if not isinstance(spec, dict):
            raise ValueError("not a JSON object")
        tile, overlap = check_tiling(spec.get("tile"), spec.get("overlap", 0))
        bs = spec.get("batch_size", TILE_BATCH)
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"batch_size must be a positive integer, got {bs!r}")
    except (ValueError, OSError) as e:
        raise LoadError(f"{f}: {e}") from None
    return {"tile": tile, "overlap": overlap, "batch_size": bs}
