"""`anomalab predict`: from a folder of images to verdicts a person can see and check.

For every readable image, scored exactly as `anomalab score` scores it (`anomalab.scoring.iter_scores`):

    <out>/predictions.csv     name, path, score, verdict, threshold, overlay, mask (one row per image, in input order)
    <out>/overlays/<key>.png  the image with its anomaly map on the run's colour scale (or .jpg, --format jpg)
    <out>/masks/<key>.png     the defect mask: white where the map is above the pixel threshold
    <out>/index.html          a gallery sorted by score (highest first), filterable by verdict, with the colour bar
    <out>/predict.json        the marker: what was predicted with which run and threshold, and the colour scale

<key> is the file's position in the full (unsharded) list of files and its stem (`000042_part7`), so the
outputs of `--shard 0/N` ... `--shard N-1/N` never collide. The colour scale (`ColourScale`) is fixed by the
run, never by the image: transparent at and below the median normal map pixel, blue rising to the pixel
threshold, yellow just above it to red at twice its distance from the normal level, and red beyond. The same
map value thus gives the same colour in every image, and warm colours mean exactly "above the pixel
threshold", where the mask is white. Detectors without maps, and runs without a pixel threshold (fitted before
pixel thresholds were kept), get the CSV and the gallery only, and the summary says why.

Images stream: each one's files are written as its row is produced, so a folder of any size runs in bounded
memory (the gallery keeps one short record per image). The folder is built in a hidden sibling and renamed
into place when complete (`anomalab.runs.atomic.staged_dir`, under the target's lock): an interrupted predict
leaves nothing. It never overwrites without `overwrite`, replaces only a folder predict wrote (predict.json),
and never writes into or over its inputs.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalab.errors import DataError, DataNotFoundError, ParameterError

log = logging.getLogger(__name__)

MARKER = "predict.json"
CSV_FILE = "predictions.csv"
GALLERY = "index.html"
FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg")}
COLUMNS = ["name", "path", "score", "verdict", "threshold", "overlay", "mask"]

COOL = np.array([0.15, 0.45, 1.0])  # below the pixel threshold
YELLOW = np.array([1.0, 0.85, 0.0])  # just above it
RED = np.array([0.85, 0.0, 0.0])  # at `high` and beyond
COOL_ALPHA = 0.35  # opacity of the cool tint at the threshold (0 at the normal level)
WARM_ALPHA = (0.6, 0.85)  # opacity just above the threshold and at `high`


@dataclass(frozen=True)
class ColourScale:
    """The one colour scale of a run's anomaly maps, anchored at the pixel threshold (module docstring).

    rgba(values) gives (..., 4) colours in [0, 1]; a value <= threshold is never warm (blue, at most
    COOL_ALPHA opaque), a value above it always is (yellow to red, at least WARM_ALPHA[0] opaque)."""

    low: float
    threshold: float
    high: float

    @classmethod
    def for_run(cls, pixel_threshold: float, level: float | None = None) -> ColourScale:
        """The scale of a pixel threshold and the normal maps' median pixel (`level`; 0 when unknown)."""
        t = float(pixel_threshold)
        low = float(level) if level is not None and level < t else (0.0 if t > 0 else t - 1.0)
        return cls(low=low, threshold=t, high=t + (t - low))

    def rgba(self, values: np.ndarray) -> np.ndarray:
        v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=self.low)
        out = np.zeros((*v.shape, 4))
        warm = v > self.threshold
        z = np.clip((v - self.low) / (self.threshold - self.low), 0.0, 1.0)
        out[..., :3] = COOL
        out[..., 3] = COOL_ALPHA * z
        w = np.clip((v - self.threshold) / (self.high - self.threshold), 0.0, 1.0)[warm][:, None]
        out[warm, :3] = (1 - w) * YELLOW + w * RED
        out[warm, 3] = WARM_ALPHA[0] + (WARM_ALPHA[1] - WARM_ALPHA[0]) * w[:, 0]
        return out

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1], C = 1 or 3 -> (H, W, 3)."""
    image = np.asarray(image, dtype=np.float64)
    return np.repeat(image[0][..., None], 3, axis=2) if image.shape[0] == 1 else image[:3].transpose(1, 2, 0)


def overlay(image: np.ndarray, amap: np.ndarray, scale: ColourScale) -> np.ndarray:
    """(H, W, 3) uint8: `image` ((C, H, W) in [0, 1]) with `amap` ((H, W)) blended on at the scale's colours."""
    colour = scale.rgba(amap)
    alpha = colour[..., 3:]
    out = as_rgb(image) * (1 - alpha) + colour[..., :3] * alpha
    return np.round(np.clip(out, 0.0, 1.0) * 255).astype(np.uint8)


def mask(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """(H, W) uint8 defect mask: 255 where the map is above the pixel threshold, else 0."""
    return np.where(np.asarray(amap) > pixel_threshold, 255, 0).astype(np.uint8)


def colour_bar(scale: ColourScale, width: int = 320, height: int = 14) -> bytes:
    """A PNG of the scale from a little below `low` to a little above `high`, over mid gray."""
    lo = scale.low - 0.1 * (scale.threshold - scale.low)
    hi = scale.high + 0.1 * (scale.high - scale.threshold)
    values = np.tile(np.linspace(lo, hi, width), (height, 1))
    bar = overlay(np.full((1, height, width), 0.5), values, scale)
    buffer = io.BytesIO()
    Image.fromarray(bar).save(buffer, format="PNG")
    return buffer.getvalue()


def _short(name: str) -> str:
    """The file name with its folder (`scratch/005.png`): file names repeat across defect folders."""
    path = Path(name)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def is_predict_folder(path: Path) -> bool:
    """Whether `path` holds a folder written by predict (its predict.json marker)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("kind") == "predict"
    except (ValueError, OSError, AttributeError):
        return False


def _save(array: np.ndarray, path: Path, fmt: str) -> None:
    Image.fromarray(array).save(path, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))


GALLERY_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:.6em}
.card{width:190px;margin:0;border:1px solid #ddd;border-radius:4px;padding:.3em;font-size:.8em}
.card img{width:100%;image-rendering:pixelated;display:block}
.card.anomalous{border-color:#c62828;background:#fdecea}.v{font-weight:bold}.anomalous .v{color:#c62828}
.name{overflow-wrap:anywhere;color:#555}.legend img{width:320px;height:14px;display:block;border:1px solid #999}
.ticks{position:relative;width:320px;height:1.3em;font-size:.75em;color:#555}.ticks span{position:absolute}
body[data-show=anomalous] .card:not(.anomalous){display:none}
body[data-show=normal] .card:not(.normal){display:none}
"""


def _legend(scale: ColourScale) -> str:
    lo = scale.low - 0.1 * (scale.threshold - scale.low)
    hi = scale.high + 0.1 * (scale.high - scale.threshold)

    def at(v: float) -> float:
        return 100 * (v - lo) / (hi - lo)

    src = "data:image/png;base64," + base64.b64encode(colour_bar(scale)).decode()
    ticks = "".join(f"<span style='left:{at(v):.1f}%;transform:translateX(-50%)'>{label} {v:.4g}</span>"
                    for v, label in ((scale.low, "normal"), (scale.threshold, "threshold"), (scale.high, "")))
    return (f"<div class=legend><p>Anomaly map colours, the same scale in every image: clear at and below the "
            f"normal level {scale.low:.4g}, blue up to the pixel threshold {scale.threshold:.4g}, yellow above it "
            f"to red at {scale.high:.4g} and beyond. The mask is white exactly where the colour is warm.</p>"
            f"<img alt='colour bar' src='{src}'><div class=ticks>{ticks}</div></div>")


def write_gallery(path: Path, rows: list[tuple[float, str, str, str, str]], *, title: str, about: str,
                  scale: ColourScale | None) -> Path:
    """index.html: one card per (score, name, verdict, overlay, mask) row, sorted by score (highest first),
    with a verdict filter (a few lines of inline script; no external files)."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i][0])
    n_anomalous = sum(1 for r in rows if r[2] == "anomalous")
    with path.open("w", encoding="utf-8") as f:
        f.write(f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
                f"<style>{GALLERY_STYLE}</style></head><body data-show=all><h1>{html.escape(title)}</h1>"
                f"<p>{about}</p><p>Show <select id=show onchange='document.body.dataset.show=this.value'>"
                f"<option value=all>all ({len(rows)})</option>"
                f"<option value=anomalous>anomalous ({n_anomalous})</option>"
                f"<option value=normal>normal ({len(rows) - n_anomalous})</option></select> "
                "sorted by score, highest first.</p>")
        f.write(_legend(scale) if scale is not None else "<p>No anomaly maps: scores and verdicts only.</p>")
        f.write("<div class=grid>\n")
        for i in order:
            score, name, verdict, over, msk = rows[i]
            picture = (f"<a href='{html.escape(over)}'><img loading=lazy alt='' src='{html.escape(over)}'></a>"
                       if over else "")
            link = f" · <a href='{html.escape(msk)}'>mask</a>" if msk else ""
            f.write(f"<figure class='card {verdict or 'none'}' data-name='{html.escape(name)}' "
                    f"data-score='{score!r}'>{picture}<figcaption><span class=v>{verdict or 'no threshold'}"
                    f"</span> {score:.5g}{link}<div class=name title='{html.escape(name)}'>"
                    f"{html.escape(_short(name))}</div></figcaption></figure>\n")
        f.write("</div></body></html>\n")
    return path


def predict(run_dir: str | Path, inputs: Sequence[str | Path], out: str | Path, *, fmt: str = "png",
            overwrite: bool = False, strict: bool = False, shard: str | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Write the predict folder `out` for the image files and folders `inputs` with the detector saved in
    `run_dir` (module docstring). Returns a summary: out, n_images, n_anomalous, n_skipped, notes, threshold,
    scale. strict: an unreadable file is a DataError instead of a warning and a skip."""
    from anomalab import scoring
    from anomalab._version import __version__
    from anomalab.data.folder import read_image
    from anomalab.data.transforms import resize_maps
    from anomalab.progress import Progress
    from anomalab.registry import load
    from anomalab.runs.atomic import TargetLock, staged_dir
    from anomalab.runs.outputs import check_output_dir
    from anomalab.thresholds import gives_maps, now, read_calibration

    if fmt not in FORMATS:
        raise ParameterError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    image_format, suffix = FORMATS[fmt]
    run_dir, out, inputs = Path(run_dir), Path(out), [Path(p) for p in inputs]
    check_output_dir(out, overwrite=overwrite, inputs=[run_dir, *inputs], replaceable=is_predict_folder,
                     what="predict folder")
    det = load(run_dir)
    thr = det.threshold_
    if thr is None:
        raise ParameterError(f"{run_dir} has no threshold, so nothing can be called anomalous: fit one with "
                             "`anomalab fit`, or set one with `anomalab threshold RUN --value X`")
    every = scoring.collect_files(inputs)
    files = scoring.shard(every, shard)
    first, step = scoring.parse_shard(shard) if shard else (0, 1)
    width = max(4, len(str(max(len(every) - 1, 0))))
    notes: list[str] = []
    scale = None
    if not gives_maps(det):
        notes.append(f"{det.name} gives no anomaly maps: predictions.csv and index.html only, no overlays or masks")
    elif thr.pixel_value is None:
        notes.append(f"{run_dir} has no pixel threshold (fitted before pixel thresholds were kept): no overlays or "
                     "masks; set one with `anomalab threshold RUN --normal DIR` or `--pixel-value Y`")
    else:
        # the run folder's calibration.json, also when RUN_DIR names the run's detector/ folder
        home = run_dir if (run_dir / "detector").is_dir() or run_dir.name != "detector" else run_dir.parent
        level = ((read_calibration(home) or {}).get("maps") or {}).get("level")
        scale = ColourScale.for_run(thr.pixel_value, level)
    on_error = "raise" if strict else "skip"
    rows: list[tuple[float, str, str, str, str]] = []
    n_anomalous = 0
    with TargetLock(out), staged_dir(out) as tmp:
        if scale is not None:
            (tmp / "overlays").mkdir()
            (tmp / "masks").mkdir()
        pos = 0
        with (tmp / CSV_FILE).open("w", newline="") as f, Progress("predict", len(files), unit="image",
                                                                    enabled=progress) as bar:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            for row in scoring.iter_scores(det, files, on_error=on_error, maps=scale is not None,
                                           progress=False):  # this loop's own bar counts the images
                start = pos
                while files[pos] != row["path"]:
                    pos += 1  # files skipped as unreadable
                key = f"{first + pos * step:0{width}d}_{row['path'].stem}"
                pos += 1
                over = msk = ""
                if scale is not None:
                    amap = row.pop("map")
                    try:
                        image = read_image(row["path"])
                    except (DataError, DataNotFoundError) as e:
                        if strict:
                            raise
                        log.warning("no overlay for %s: it could not be read again (%s)", row["path"], e)
                    else:
                        if tuple(amap.shape) != tuple(image.shape[1:]):
                            amap = resize_maps(amap[None], tuple(image.shape[1:]))[0]
                        amap = amap.numpy()
                        over, msk = f"overlays/{key}{suffix}", f"masks/{key}.png"
                        _save(overlay(image, amap, scale), tmp / over, image_format)
                        _save(mask(amap, scale.threshold), tmp / msk, "PNG")
                writer.writerow({"name": row["path"].name, "path": str(row["path"]), "score": row["score"],
                                 "verdict": row["verdict"], "threshold": thr.value, "overlay": over, "mask": msk})
                rows.append((row["score"], str(row["path"]), row["verdict"], over, msk))
                n_anomalous += row["verdict"] == "anomalous"
                bar.update(pos - start)
            bar.update(len(files) - pos)
        about = (f"{len(rows)} images scored with <code>{html.escape(str(run_dir))}</code> ({html.escape(det.name)}); "
                 f"threshold {thr.value:.5g}: a score above it is anomalous ({n_anomalous} here)."
                 + ("" if not notes else " " + html.escape(" ".join(notes))))
        write_gallery(tmp / GALLERY, rows, title=f"anomalab predict: {len(rows)} images", about=about, scale=scale)
        summary = {"kind": "predict", "format": 1, "anomalab_version": __version__, "created": now(),
                   "run": str(run_dir.resolve()), "detector": det.name, "inputs": [str(p) for p in inputs],
                   "shard": shard, "n_files": len(files), "n_images": len(rows), "n_skipped": len(files) - len(rows),
                   "n_anomalous": n_anomalous, "threshold": thr.to_dict(),
                   "colour_scale": None if scale is None else scale.to_dict(), "overlays": scale is not None,
                   "image_format": fmt, "notes": notes}
        (tmp / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
    return {**summary, "out": out, "scale": scale}
