"""Texture anomaly datasets built from scikit-image's real photos (brick, grass, gravel), written in
the MVTec AD layout so every loader and tool reads them like any MVTec category.

Each photo is 512 x 512 gray. Training crops come from its top rows, test crops from the rows below
(disjoint regions: no test pixel was seen in training). Test crops get synthetic defects from
`anomalab.generate.defects` (scratch, blob/stain, missing patch, intensity shift) with pixel masks.
Defaults (size 128, 100 train, 20 good + 10 per defect type in test) make a three-category benchmark
that builds in seconds and trains on a CPU in minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from anomalab._version import __version__
from anomalab.errors import ParameterError
from anomalab.generate.defects import DEFECTS
from anomalab.runs.atomic import staged_dir
from anomalab.runs.outputs import check_output_dir

CATEGORIES = ("brick", "grass", "gravel")
INFO_FILE = "textures.json"  # the settings that built a category; marks a folder this builder wrote
DEFECT_TYPES = ("scratch", "blob", "missing_patch", "intensity_shift")
TRAIN_FRACTION = 0.625  # rows [0, 320) of a 512-row photo train, rows [320, 512) test


def texture_photo(category: str) -> np.ndarray:
    """The scikit-image photo of `category` as (H, W) float32 in [0, 1] (shipped with scikit-image)."""
    import skimage.data

    if category not in CATEGORIES:
        raise ParameterError(f"unknown texture '{category}'; known: {', '.join(CATEGORIES)}")
    photo = np.asarray(getattr(skimage.data, category)(), dtype=np.float32) / 255.0
    return photo if photo.ndim == 2 else photo.mean(-1)


def _crops(photo: np.ndarray, rows: tuple[int, int], n: int, crop: int, size: int,
           rng: np.random.Generator) -> list[np.ndarray]:
    """n random crop x crop windows lying wholly inside photo[rows[0]:rows[1]], resized to size."""
    lo, hi = rows
    if hi - lo < crop or photo.shape[1] < crop:
        raise ValueError(f"crop {crop} does not fit in rows {lo}-{hi} of a {photo.shape} photo")
    out = []
    for _ in range(n):
        y = int(rng.integers(lo, hi - crop + 1))
        x = int(rng.integers(0, photo.shape[1] - crop + 1))
        patch = photo[y : y + crop, x : x + crop]
        if crop != size:
            im = Image.fromarray((patch * 255).round().astype(np.uint8)).resize((size, size), Image.BILINEAR)
            patch = np.asarray(im, dtype=np.float32) / 255.0
        out.append(patch)
    return out


def _write_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(path)


def make_textures(out_dir: str | Path, categories: tuple[str, ...] = CATEGORIES, size: int = 128,
                  n_train: int = 100, n_test_good: int = 20, n_test_per_defect: int = 10,
                  defects: tuple[str, ...] = DEFECT_TYPES, crop: int | None = None, seed: int = 0,
                  overwrite: bool = False) -> Path:
    """Write `<out_dir>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}` PNGs
    and `<category>/textures.json` (the settings that built it).

    size: side of the written images; crop: side of the window cut from the 512 px photo (default =
    size; a larger crop is shrunk to size, showing more of the texture). The same seed writes the same
    files. An existing category folder this builder wrote (textures.json) is replaced only with
    overwrite=True, and only once the new one is complete; any other non-empty folder is refused. Returns out_dir.
    """
    out = Path(out_dir)
    crop = crop or size
    unknown = [d for d in defects if d not in DEFECTS]
    if unknown:
        raise ParameterError(f"unknown defect type(s) {unknown}; known: {', '.join(DEFECTS)}")
    for category in categories:  # every target checked before anything is written
        check_output_dir(out / category, overwrite=overwrite, replaceable=lambda p: (p / INFO_FILE).is_file(),
                         what="texture dataset (textures.json)")
    for ci, category in enumerate(categories):
        with staged_dir(out / category) as tmp:
            _write_category(tmp, category, ci, size, n_train, n_test_good, n_test_per_defect, defects, crop, seed)
    return out


def _write_category(folder: Path, category: str, ci: int, size: int, n_train: int, n_test_good: int,
                    n_test_per_defect: int, defects: tuple[str, ...], crop: int, seed: int) -> None:
    """Write one category's images, masks and textures.json into `folder` (a staged copy of its target)."""
    rng = np.random.default_rng([seed, ci])
    photo = texture_photo(category)
    split_row = int(round(photo.shape[0] * TRAIN_FRACTION))
    train = _crops(photo, (0, split_row), n_train, crop, size, rng)
    test_rows = (split_row, photo.shape[0])
    for i, img in enumerate(train):
        _write_png(img, folder / "train" / "good" / f"{i:03d}.png")
    for i, img in enumerate(_crops(photo, test_rows, n_test_good, crop, size, rng)):
        _write_png(img, folder / "test" / "good" / f"{i:03d}.png")
    for defect in defects:
        for i, img in enumerate(_crops(photo, test_rows, n_test_per_defect, crop, size, rng)):
            bad, mask = DEFECTS[defect](img[None], rng)
            _write_png(bad[0], folder / "test" / defect / f"{i:03d}.png")
            _write_png(mask, folder / "ground_truth" / defect / f"{i:03d}_mask.png")
    info = {
        "builder": "anomalab.data.textures.make_textures", "anomalab_version": __version__,
        "category": category, "size": size, "crop": crop, "n_train": n_train,
        "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect, "defects": list(defects),
        "seed": seed, "train_rows": [0, split_row], "test_rows": list(test_rows),
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1))
