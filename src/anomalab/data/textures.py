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
import torch
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
                  split: str = "rows", overwrite: bool = False) -> Path:
    """Write `<out_dir>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}` PNGs
    and `<category>/textures.json` (the settings that built it).

    size: side of the written images; crop: side of the window cut from the 512 px photo (default =
    size; a larger crop is shrunk to size, showing more of the texture). split: "rows" (training crops
    from the photo's top rows, test crops from the rows below) or "columns" (left columns / right columns:
    every row of the photo in both, which removes the shift between its top and bottom, e.g. the
    perspective of the grass photo). The same seed writes the same
    files. An existing category folder this builder wrote (textures.json) is replaced only with
    overwrite=True, and only once the new one is complete; any other non-empty folder is refused. Returns out_dir.
    """
    out = Path(out_dir)
    crop = crop or size
    _check_split(split)
    unknown = [d for d in defects if d not in DEFECTS]
    if unknown:
        raise ParameterError(f"unknown defect type(s) {unknown}; known: {', '.join(DEFECTS)}")
    for category in categories:  # every target checked before anything is written
        check_output_dir(out / category, overwrite=overwrite, replaceable=lambda p: (p / INFO_FILE).is_file(),
                         what="texture dataset (textures.json)")
    for category in categories:
        texture_photo(category)  # an unknown category is refused before anything is written
    for category in categories:
        ci = CATEGORIES.index(category)  # each photo its own random stream: the files never depend on what
        with staged_dir(out / category) as tmp:  # else was asked for in the same call
            _write_category(tmp, category, ci, size, n_train, n_test_good, n_test_per_defect, defects, crop, seed,
                            split)
    return out


SPLITS = ("rows", "columns")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ParameterError(f"split must be 'rows' or 'columns', got {split!r}")


def _oriented(photo: np.ndarray, split: str) -> np.ndarray:
    """The photo as the row-wise cutting sees it: transposed for a split by columns (crops are transposed
    back by `_upright`)."""
    return photo.T.copy() if split == "columns" else photo


def _upright(crops: list[np.ndarray], split: str) -> list[np.ndarray]:
    return [c.T.copy() for c in crops] if split == "columns" else crops


def _write_category(folder: Path, category: str, ci: int, size: int, n_train: int, n_test_good: int,
                    n_test_per_defect: int, defects: tuple[str, ...], crop: int, seed: int,
                    split: str = "rows") -> None:
    """Write one category's images, masks and textures.json into `folder` (a staged copy of its target)."""
    rng = np.random.default_rng([seed, ci])
    photo = _oriented(texture_photo(category), split)
    split_row = int(round(photo.shape[0] * TRAIN_FRACTION))
    train = _upright(_crops(photo, (0, split_row), n_train, crop, size, rng), split)
    test_rows = (split_row, photo.shape[0])
    for i, img in enumerate(train):
        _write_png(img, folder / "train" / "good" / f"{i:03d}.png")
    for i, img in enumerate(_upright(_crops(photo, test_rows, n_test_good, crop, size, rng), split)):
        _write_png(img, folder / "test" / "good" / f"{i:03d}.png")
    for defect in defects:
        for i, img in enumerate(_upright(_crops(photo, test_rows, n_test_per_defect, crop, size, rng), split)):
            bad, mask = DEFECTS[defect](img[None], rng)
            _write_png(bad[0], folder / "test" / defect / f"{i:03d}.png")
            _write_png(mask, folder / "ground_truth" / defect / f"{i:03d}_mask.png")
    info = {
        "builder": "anomalab.data.textures.make_textures", "anomalab_version": __version__,
        "category": category, "size": size, "crop": crop, "n_train": n_train,
        "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect, "defects": list(defects),
        "seed": seed, "split": split, f"train_{split}": [0, split_row], f"test_{split}": list(test_rows),
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1))


def _grid(photo: np.ndarray, rows: tuple[int, int], crop: int, stride: int) -> list[np.ndarray]:
    """Every crop x crop window of photo[rows[0]:rows[1]] on a regular grid of `stride` px, row-major."""
    lo, hi = rows
    if hi - lo < crop or photo.shape[1] < crop:
        raise ParameterError(f"crop {crop} does not fit in rows {lo}-{hi} of a {photo.shape} photo")
    return [photo[y : y + crop, x : x + crop] for y in range(lo, hi - crop + 1, stride)
            for x in range(0, photo.shape[1] - crop + 1, stride)]


def make_strided(out_dir: str | Path, category: str = "brick", crop: int = 128, train_stride: int = 16,
                 test_stride: int = 32, defects: tuple[str, ...] = ("scratch", "blob"),
                 defective_fraction: float = 0.5, seed: int = 0, split: str = "rows", overwrite: bool = False) -> Path:
    """The strided split of one photo, in the MVTec AD layout at `<out_dir>/<category>_strided`:
    training = every crop x crop window of the top half on a `train_stride` grid (brick, defaults: 9 x 25 =
    225 crops of 128 px), test = every window of the bottom half on a `test_stride` grid (5 x 13 = 65); a
    seeded `defective_fraction` of the test windows gets one synthetic defect (the kinds of `defects` in
    turn) with its mask, the rest stay good. Overlapping training windows see each texture position many
    times, as a line camera does; no test pixel lies in the training half. split="columns" uses the left
    and right halves instead (every row of the photo in both). Returns the category folder."""
    _check_split(split)
    unknown = [d for d in defects if d not in DEFECTS]
    if unknown or not defects:
        raise ParameterError(f"unknown defect type(s) {unknown}; known: {', '.join(DEFECTS)}")
    if not 0 < defective_fraction < 1:
        raise ParameterError(f"defective_fraction must be in (0, 1), got {defective_fraction}")
    for name, v in (("crop", crop), ("train_stride", train_stride), ("test_stride", test_stride)):
        if v < 1:
            raise ParameterError(f"{name} must be a positive integer, got {v}")
    target = Path(out_dir) / (f"{category}_strided" + ("_columns" if split == "columns" else ""))
    check_output_dir(target, overwrite=overwrite, replaceable=lambda p: (p / INFO_FILE).is_file(),
                     what="texture dataset (textures.json)")
    photo = _oriented(texture_photo(category), split)
    half = photo.shape[0] // 2
    train = _upright(_grid(photo, (0, half), crop, train_stride), split)
    test = _upright(_grid(photo, (half, photo.shape[0]), crop, test_stride), split)
    rng = np.random.default_rng([seed, CATEGORIES.index(category)])
    bad = np.sort(rng.choice(len(test), int(round(len(test) * defective_fraction)), replace=False))
    with staged_dir(target) as folder:
        for i, img in enumerate(train):
            _write_png(img, folder / "train" / "good" / f"{i:03d}.png")
        kinds = {}
        for j, i in enumerate(bad):
            kind = defects[j % len(defects)]
            img, mask = DEFECTS[kind](test[i][None], rng)
            _write_png(img[0], folder / "test" / kind / f"{i:03d}.png")
            _write_png(mask, folder / "ground_truth" / kind / f"{i:03d}_mask.png")
            kinds[int(i)] = kind
        for i, img in enumerate(test):
            if i not in kinds:
                _write_png(img, folder / "test" / "good" / f"{i:03d}.png")
        info = {"builder": "anomalab.data.textures.make_strided", "anomalab_version": __version__,
                "category": category, "crop": crop, "size": crop, "train_stride": train_stride,
                "test_stride": test_stride, "n_train": len(train), "n_test": len(test),
                "defective": {str(k): v for k, v in kinds.items()}, "defects": list(defects),
                "defective_fraction": defective_fraction, "seed": seed, "split": split,
                f"train_{split}": [0, half], f"test_{split}": [half, photo.shape[0]]}
        (folder / INFO_FILE).write_text(json.dumps(info, indent=1))
    return target


class TexturePatches:
    """Windows of a texture photo drawn on demand, for models trained in steps (the beta-VAE teacher and
    the beta-VAEGAN student take any source with `sample(n, rng)` and `len()`, as dSprites).

    The photo's rows [0, 62.5 %) (`part="train"`) or the rows below (`part="test"`, the split of
    `make_textures`) are shrunk by `shrink` (box average: a window of `size` shows `size * shrink` pixels of
    the photo) and cut into every `size` x `size` window; `sample` draws windows uniformly. `channels` = 3
    repeats the gray image (the student's RGB input)."""

    def __init__(self, category: str = "grass", part: str = "train", size: int = 64, shrink: int = 2,
                 channels: int = 1):
        if part not in ("train", "test"):
            raise ParameterError(f"part must be 'train' or 'test', got {part!r}")
        if channels not in (1, 3):
            raise ParameterError(f"channels must be 1 or 3, got {channels!r}")
        photo = texture_photo(category)
        split_row = int(round(photo.shape[0] * TRAIN_FRACTION))
        photo = photo[:split_row] if part == "train" else photo[split_row:]
        h, w = (photo.shape[0] // shrink) * shrink, (photo.shape[1] // shrink) * shrink
        small = photo[:h, :w].reshape(h // shrink, shrink, w // shrink, shrink).mean((1, 3))
        if min(small.shape) < size:
            raise ParameterError(f"{category} {part} rows shrunk by {shrink} are {small.shape}: no {size} px window")
        self.category, self.part, self.size, self.channels = category, part, size, channels
        self.photo = torch.from_numpy(np.ascontiguousarray(small, dtype=np.float32))
        self.rows, self.cols = small.shape[0] - size + 1, small.shape[1] - size + 1

    def __len__(self) -> int:
        return self.rows * self.cols

    def sample(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
        """n uniformly drawn windows (n, channels, size, size) in [0, 1] and their (row, col) corners."""
        corners = np.stack([rng.integers(0, self.rows, size=n), rng.integers(0, self.cols, size=n)], axis=1)
        windows = self.photo.unfold(0, self.size, 1).unfold(1, self.size, 1)  # (rows, cols, size, size), a view
        out = windows[torch.from_numpy(corners[:, 0]), torch.from_numpy(corners[:, 1])].unsqueeze(1)
        return out.expand(-1, self.channels, -1, -1).contiguous(), corners
