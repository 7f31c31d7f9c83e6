"""A labelled test set from a folder of good images: synthetic defects, with masks, painted onto held-out
copies, written in the MVTec AD layout so `fit` and `evaluate` read it like any category.

    OUT/train/good/<file>                       the good images not held out, copied byte for byte
    OUT/test/good/<stem>.png                    the n held-out good images
    OUT/test/<kind>/<stem>.png                  each held-out image with one defect of <kind>
    OUT/ground_truth/<kind>/<stem>_mask.png     its mask (255 = defective pixel)
    OUT/make_defects.json                       how the folder was made; marks it as this builder's

The same n held-out images are the good test images and the bases of every kind's defects, so each
defective image has its defect-free twin in test/good and the AUROC measures the defect alone; none of them
is in train/good. Defects come from `anomalab.generate.defects` (their sizes scale with the image).

`degree` in [0, 1] sets the defect's strength: defective = base + degree * (defect - base), so 0 leaves the
image as it is, 1 paints the generator's full defect, and one seed gives the same defect shapes and places at
every degree: a sweep over degrees shows how the AUROC grows with the strength alone. The mask is the
generator's defect region plus any pixel the defect changed (the soft rim of a blob), at every degree.
Test images are written as PNG at each file's own size and channel count (16-bit for 16-bit or float gray
files), so a defective image and its twin differ only where the defect is.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalab._version import __version__
from anomalab.data.folder import _HIGH_DEPTH, _READ_ERRORS, _open, list_images, read_image, subfolders
from anomalab.errors import DataError, ParameterError
from anomalab.generate.defects import DEFECTS, TEST_DEFECTS
from anomalab.progress import progress
from anomalab.runs.atomic import staged_dir
from anomalab.runs.outputs import check_output_dir

log = logging.getLogger(__name__)

MARKER = "make_defects.json"  # written last into every folder this builder made
KINDS = TEST_DEFECTS  # scratch, blob, missing_patch, intensity_shift
MIN_TRAIN = 2  # good images that must remain for train/good


def _high_depth(path: Path) -> bool:
    """Whether the file holds 16-bit or float gray pixels (from its header); DataError when unreadable."""
    try:
        with _open(path) as im:
            return im.mode in _HIGH_DEPTH
    except _READ_ERRORS as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _to_file(arr: np.ndarray, path: Path, sixteen_bit: bool) -> None:
    """(C, H, W) in [0, 1] -> PNG: 8-bit gray/RGB, or 16-bit gray when `sixteen_bit` and C = 1."""
    arr = np.clip(arr, 0.0, 1.0)
    if sixteen_bit and arr.shape[0] == 1:
        Image.fromarray((arr[0] * 65535).round().astype(np.uint16)).save(path)
        return
    q = (arr * 255).round().astype(np.uint8)
    Image.fromarray(q[0] if q.shape[0] == 1 else q.transpose(1, 2, 0)).save(path)


def _quantised(arr: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    scale = 65535 if sixteen_bit and arr.shape[0] == 1 else 255
    return (np.clip(arr, 0.0, 1.0) * scale).round()


def _stems(paths: list[Path]) -> list[str]:
    """Output stems: the file's stem, or `<stem>_<suffix>` where two held-out files share a stem."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    return [p.stem if counts[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in paths]


def _check(kinds: tuple[str, ...], n: Any, degree: Any, seed: Any) -> None:
    if not kinds:
        raise ParameterError(f"give at least one defect kind: {', '.join(KINDS)}")
    unknown = [k for k in kinds if k not in DEFECTS]
    if unknown:
        raise ParameterError(f"unknown defect kind{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                             f"known: {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ParameterError(f"a defect kind is given twice: {', '.join(kinds)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParameterError(f"n must be a positive integer, got {n!r}")
    if isinstance(degree, bool) or not isinstance(degree, (int, float)) or not 0.0 <= degree <= 1.0:
        raise ParameterError(f"degree must be a number in [0, 1], got {degree!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParameterError(f"seed must be an integer >= 0, got {seed!r}")


def make_defects(images: str | Path, out: str | Path, kinds: tuple[str, ...] | list[str] = KINDS, n: int = 10,
                 degree: float = 1.0, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write the folder described in the module docstring from the good images directly in `images`.

    kinds: defect generators (names in `anomalab.generate.defects.DEFECTS`); n: good images held out, each
    one test/good image and the base of one defect of every kind; degree: strength in [0, 1]; seed: which
    images are held out and which defects they get. `out` must not be `images` nor lie inside it; an
    existing folder is replaced only with overwrite=True and only when this builder wrote it (its
    make_defects.json), and only once the new one is complete. Unreadable files are skipped with one warning.
    Returns the record written to make_defects.json.
    """
    kinds = tuple(kinds)
    _check(kinds, n, degree, seed)
    images, out = Path(images), Path(out)
    check_output_dir(out, overwrite=overwrite, inputs=[images], replaceable=lambda p: (p / MARKER).is_file(),
                     what="make-defects folder (make_defects.json)", flag="--out")
    files = list_images(images)
    below = subfolders(images)
    if below:
        log.warning("reading only the images directly in %s; its subfolders (%s) are skipped", images,
                    ", ".join(below[:8]) + (", ..." if len(below) > 8 else ""))
    readable, skipped = [], []
    for p in files:
        try:
            readable.append((p, _high_depth(p)))
        except DataError:
            skipped.append(p.name)
    # held out: the first n files in a seeded order that decode in full (truncated data fails only then)
    held: list[int] = []
    undecodable: list[str] = []
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(readable))]
    position = 0
    while len(held) < n and position < len(order):
        i = order[position]
        position += 1
        try:
            read_image(readable[i][0])  # read again when painted: n decoded photos need not fit in memory
            held.append(i)
        except DataError:
            undecodable.append(readable[i][0].name)
    train = sorted(order[position:])
    skipped += undecodable
    if skipped:
        log.warning("skipping %d unreadable file%s of %s (e.g. %s)", len(skipped), "s" if len(skipped) > 1 else "",
                    images, skipped[0])
    if len(held) < n or len(train) < MIN_TRAIN:
        usable = len(readable) - len(undecodable)
        raise DataError(f"{images} has {usable} readable images: --n {n} holds out {n} for the test set and "
                        f"at least {MIN_TRAIN} must remain to train on; pass a smaller --n or add images")
    held_index = sorted(held)
    held_paths = [readable[i][0] for i in held_index]
    stems = _stems(held_paths)
    degree = float(degree)
    record: dict[str, Any] = {
        "builder": "anomalab.data.make_defects.make_defects", "anomalab_version": __version__,
        "images": str(images.resolve()), "kinds": list(kinds), "n": n, "degree": degree, "seed": seed,
        "n_train": len(train), "held_out": [p.name for p in held_paths], "skipped": sorted(skipped),
    }
    with staged_dir(out) as tmp:
        (tmp / "train" / "good").mkdir(parents=True)
        for i in train:
            shutil.copyfile(readable[i][0], tmp / "train" / "good" / readable[i][0].name)
        for folder in ("test/good", *(f"test/{k}" for k in kinds), *(f"ground_truth/{k}" for k in kinds)):
            (tmp / folder).mkdir(parents=True)
        for j, (i, stem) in enumerate(progress(list(zip(held_index, stems)), "make-defects", unit="image")):
            path, deep = readable[i]
            base = read_image(path)
            _to_file(base, tmp / "test" / "good" / f"{stem}.png", deep)
            ref = _quantised(base, deep)
            for kind in kinds:
                rng = np.random.default_rng([seed, list(DEFECTS).index(kind), j])
                bad, mask = DEFECTS[kind](base, rng)
                if degree < 1.0:
                    bad = base + np.float32(degree) * (bad - base)
                changed = (_quantised(bad, deep) != ref).any(0)
                _to_file(bad, tmp / "test" / kind / f"{stem}.png", deep)
                full = (mask > 0.5) | changed
                Image.fromarray(full.astype(np.uint8) * 255).save(tmp / "ground_truth" / kind / f"{stem}_mask.png")
        (tmp / MARKER).write_text(json.dumps(record, indent=1))
    return record
