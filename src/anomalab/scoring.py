"""Scoring image files with a fitted detector, so that a file's score depends on that file alone.

`collect_files` turns files and folders into a list of image paths, `shard` keeps every N-th of them (to
split the work over processes), and `iter_scores` yields one row per readable file:

    {"name": str(path), "path": path, "score": float, "verdict": "anomalous" | "normal" | ""}

plus `"map"`, an (H, W) anomaly map at the file's own resolution, with `maps=True`. The verdict compares
the score with the detector's saved threshold ("" when it has none); a score strictly above it is anomalous.

Each file is read at its own size, with the detector's channel count (`anomalab.data.folder.read_image`),
and brought to the detector's input shape on its own (`anomalab.data.transforms.prepare`), so no other
file decides how it is resized. The prepared images are scored in batches of exactly `batch_size` rows,
the last one padded with blank images: linear-algebra libraries choose their kernels by matrix size, so a
fixed batch size is what makes a file's score bit-identical whichever files, how many, and in which order
are scored with it. Joining `shard(files, "0/2")` and `shard(files, "1/2")` gives the unsharded scores.
Files are read `chunk` at a time, so folders of any size score in bounded memory.

A tiled detector (`anomalab.tiling.TiledDetector`, a run fitted with `--tile`) is given each file at its own
size instead, one file at a time: its tiles are scored `batch_size` at a time, the score is the max over
them and the map, stitched from the tiles' maps, has the file's own (H, W). A file smaller than a tile
counts as unreadable (skipped with a warning, or its DataError with on_error="raise").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anomalab.data.folder import list_images, read_image
from anomalab.data.transforms import prepare, resize_maps
from anomalab.errors import DataError, DataNotFoundError, NotFittedError, ParameterError
from anomalab.progress import Progress

log = logging.getLogger(__name__)

SCORE_CHUNK = 256  # files read per step
SCORE_BATCH = 32  # rows per detector call; part of what a score depends on, so keep it fixed across shards


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given and, for each folder, its image files sorted by name (`list_images`). A path that
    does not exist is a DataNotFoundError; a folder without images a DataError."""
    files: list[Path] = []
    given = [Path(p) for p in paths]
    if not given:
        raise DataError("no image files or folders to score")
    for p in given:
        if p.is_dir():
            files += list_images(p)
        elif p.is_file():
            files.append(p)
        else:
            raise DataNotFoundError(f"no such file or folder: {p}")
    return files


def parse_shard(spec: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N; a ParameterError otherwise."""
    k, sep, n = str(spec).partition("/")
    try:
        k_i, n_i = int(k), int(n)
    except ValueError:
        k_i, n_i = -1, 0
    if not sep or not 0 <= k_i < n_i:
        raise ParameterError(f"shard must be K/N with 0 <= K < N (e.g. 0/4), got {spec!r}")
    return k_i, n_i


def shard(files: Sequence[Path], spec: str | None) -> list[Path]:
    """Every N-th file starting at K (0-based) for spec 'K/N'; all files for None or ''."""
    if not spec:
        return list(files)
    k, n = parse_shard(spec)
    return list(files[k::n])


def verdict(det: Any, score: float) -> str:
    """'anomalous' above the detector's threshold, else 'normal'; '' when it has no threshold."""
    thr = getattr(det, "threshold_", None)
    if thr is None:
        return ""
    return "anomalous" if score > thr.value else "normal"


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{name} must be a positive integer, got {value!r}")
    return value


def _read(files: Sequence[Path], shape: tuple[int, int, int], on_error: str) -> list[tuple[Path, Tensor, tuple]]:
    """(path, (C, H, W) image at the detector's shape, the file's own (H, W)) per readable file."""
    out = []
    for path in files:
        try:
            arr = read_image(path, channels=shape[0])
        except (DataError, DataNotFoundError) as e:
            if on_error == "raise":
                raise
            log.warning("skipping unreadable image %s (%s)", path, e)
            continue
        out.append((path, prepare(torch.from_numpy(arr)[None], shape)[0], tuple(arr.shape[1:])))
    return out


def _padded_batches(images: Tensor, batch_size: int) -> Iterator[tuple[Tensor, int]]:
    """(batch of exactly batch_size rows, number of real rows in it)."""
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        n = len(batch)
        if n < batch_size:
            pad = torch.zeros((batch_size - n, *batch.shape[1:]), dtype=batch.dtype)
            batch = torch.cat([batch, pad])
        yield batch, n


def iter_scores(det: Any, files: Sequence[str | Path], *, on_error: str = "skip", chunk: int = SCORE_CHUNK,
                batch_size: int = SCORE_BATCH, maps: bool = False, progress: bool = True) -> Iterator[dict[str, Any]]:
    """Score `files` with the fitted detector `det`, in order: one row per readable file (see the module
    docstring), "map" added with maps=True. on_error: "skip" logs and leaves out an unreadable file,
    "raise" raises its DataError (DataNotFoundError for a missing file). A detector without anomaly maps
    asked for them is a ParameterError. progress: files scored so far, counted chunk by chunk
    (`anomalab.progress`: a bar on a terminal, else one line when the scoring ends)."""
    if on_error not in ("skip", "raise"):
        raise ParameterError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    chunk, batch_size = _positive("chunk", chunk), _positive("batch_size", batch_size)
    shape = getattr(det, "input_shape_", None)
    if shape is None:
        raise NotFittedError(f"{getattr(det, 'name', '') or type(det).__name__} is not fitted: call fit(train) first")
    shape = tuple(int(s) for s in shape)
    files = [Path(f) for f in files]
    with Progress(f"{getattr(det, 'name', '') or 'detector'} score", len(files), unit="file",
                  enabled=progress) as bar:
        if getattr(det, "tiling", None) is not None and hasattr(det, "score_image"):
            yield from _score_tiled(det, files, shape[0], on_error, batch_size, maps, bar)
        else:
            yield from _score_chunks(det, files, shape, on_error, chunk, batch_size, maps, bar)


def _score_tiled(det: Any, files: list[Path], channels: int, on_error: str, batch_size: int, maps: bool,
                 bar: Progress) -> Iterator[dict[str, Any]]:
    """The rows of `iter_scores` for a tiled detector: one file at a time, at its own size."""
    for path in files:
        try:
            image = torch.from_numpy(read_image(path, channels=channels))
            if min(image.shape[1:]) < det.tile:
                raise DataError(f"image {path} is {image.shape[1]}x{image.shape[2]} (H x W), smaller than the "
                                f"run's {det.tile}x{det.tile} tiles")
        except (DataError, DataNotFoundError) as e:
            bar.update(1)
            if on_error == "raise":
                raise
            log.warning("skipping unreadable image %s (%s)", path, e)
            continue
        try:
            score, amap = det.score_image(image, maps=maps, batch_size=batch_size)
        except NotImplementedError as e:
            raise ParameterError(f"{e}; score without maps") from None
        bar.update(1)
        row: dict[str, Any] = {"name": str(path), "path": path, "score": score, "verdict": verdict(det, score)}
        if maps:
            row["map"] = amap
        yield row


def _score_chunks(det: Any, files: list[Path], shape: tuple[int, ...], on_error: str, chunk: int, batch_size: int,
                  maps: bool, bar: Progress) -> Iterator[dict[str, Any]]:
    """The rows of `iter_scores`, chunk by chunk; `bar` counts the files of each chunk once it is scored."""
    for start in range(0, len(files), chunk):
        part = files[start : start + chunk]
        read = _read(part, shape, on_error)
        if not read:
            bar.update(len(part))
            continue
        images = torch.stack([x for _, x, _ in read])
        scores: list[float] = []
        chunk_maps: list[Tensor] = []
        for batch, n in _padded_batches(images, batch_size):
            scores += det.score(batch, batch_size=batch_size)[:n].tolist()
            if maps:
                try:
                    chunk_maps += list(det.score_map(batch, batch_size=batch_size)[:n])
                except NotImplementedError as e:
                    raise ParameterError(f"{getattr(det, 'name', type(det).__name__)} gives no anomaly maps "
                                         f"({e}); score without maps") from None
        bar.update(len(part))
        for i, (path, _, own_size) in enumerate(read):
            row: dict[str, Any] = {"name": str(path), "path": path, "score": scores[i],
                                   "verdict": verdict(det, scores[i])}
            if maps:
                row["map"] = resize_maps(chunk_maps[i][None], own_size)[0]
            yield row


def merged_rows(det: Any, files: Sequence[str | Path], **kwargs: Any) -> list[dict[str, Any]] | None:
    """`iter_scores` over the ranks of `anomalab.distributed` (under torchrun): rank r scores the files r, r + N,
    ...; rank 0 gets every row in the order of `files` (exactly the unsharded rows: a file's score depends on
    that file alone), the other ranks None. A failure on any rank stops every rank with its message."""
    from anomalab import distributed

    group = distributed.group()
    if group is None:
        return list(iter_scores(det, files, **kwargs))
    import torch.distributed as dist

    files = [Path(f) for f in files]
    mine = files[group.rank :: group.world]

    def score_mine() -> list[tuple[int, dict[str, Any]]]:
        out, pos = [], 0
        for row in iter_scores(det, mine, progress=kwargs.pop("progress", True) and group.rank == 0, **kwargs):
            while mine[pos] != row["path"]:
                pos += 1  # files skipped as unreadable
            out.append((group.rank + pos * group.world, row))
            pos += 1
        return out

    local = distributed.agree(score_mine, group)
    everyone: list[Any] = [None] * group.world if group.rank == 0 else None
    dist.gather_object(local, everyone, dst=0)
    if group.rank != 0:
        return None
    return [row for _, row in sorted((pair for part in everyone for pair in part), key=lambda p: p[0])]


def format_rows(rows: Sequence[dict[str, Any]], fmt: str = "csv", threshold: Any = None) -> str:
    """Rows of `iter_scores` as CSV (name, score, verdict) or JSON ({"threshold": ..., "results": [...]})."""
    import csv
    import io
    import json

    fields = ["name", "score", "verdict"]
    if fmt == "json":
        record = {"threshold": None if threshold is None else threshold.to_dict(),
                  "results": [{k: r[k] for k in fields} for r in rows]}
        return json.dumps(record, indent=1) + "\n"
    if fmt != "csv":
        raise ParameterError(f"format must be csv or json, got {fmt!r}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
