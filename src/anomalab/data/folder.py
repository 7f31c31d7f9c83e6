"""Image folders: the MVTec AD layout and plain folders of good images.

MVTec AD layout of one category (the `textures` builder writes the same):

    <root>/<category>/train/good/*.png                 normal training images
    <root>/<category>/test/good/*.png                  normal test images (label 0)
    <root>/<category>/test/<defect>/*.png              anomalous test images (label 1)
    <root>/<category>/ground_truth/<defect>/<name>_mask.png   pixel masks (also accepted: <name>.png)

Images may be grayscale or RGB, of any size. Loading is split in two so big sets can stream: `list_*`
functions return file records only; `load_samples` / `iter_batches` read them into `ImageSet`s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from anomalab.types import ImageSet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image file: its label (0 good / 1 defective), defect type and mask file (or None)."""

    path: Path
    label: int = 0
    defect: str = GOOD
    mask_path: Path | None = None


def _size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name. Raises FileNotFoundError for a missing folder
    and ValueError for a folder without images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _category_dir(root: str | Path, category: str | None) -> Path:
    base = Path(root) if category is None else Path(root) / category
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {base}")
    if not (base / "train").is_dir() and not (base / "test").is_dir():
        raise ValueError(f"{base} is not an MVTec-layout category: it has neither train/ nor test/")
    return base


def _find_mask(base: Path, defect: str, image: Path) -> Path | None:
    folder = base / "ground_truth" / defect
    for stem in (f"{image.stem}_mask", image.stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def list_mvtec(root: str | Path, category: str | None = None, split: str = "test") -> list[Sample]:
    """File records of one split ("train" or "test") of an MVTec-layout category.

    root: the dataset folder holding <category>/, or the category folder itself (category=None).
    Test images in test/good are normal; every other subfolder of test/ is a defect type.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = _category_dir(root, category)
    split_dir = base / split
    if split == "train":
        return [Sample(p) for p in list_images(split_dir / GOOD)]
    if not split_dir.is_dir():
        raise FileNotFoundError(f"test folder not found: {split_dir}")
    defects = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not defects:
        raise ValueError(f"no defect-type folders (good/, <defect>/) in {split_dir}")
    samples: list[Sample] = []
    defects.sort(key=lambda d: d != GOOD)  # good first, then the defect types by name
    for defect in defects:
        for p in list_images(split_dir / defect):
            if defect == GOOD:
                samples.append(Sample(p))
            else:
                samples.append(Sample(p, 1, defect, _find_mask(base, defect, p)))
    return samples


def read_image(path: Path, channels: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """One file -> (C, H, W) float32 in [0, 1]; C = channels, or 1 for gray files / 3 for colour ones."""
    with Image.open(path) as im:
        im.load()
        gray = im.mode in ("1", "L", "I", "I;16", "F") or (im.mode == "P" and _palette_is_gray(im))
        c = channels if channels is not None else (1 if gray else 3)
        if im.mode in ("I", "I;16", "F"):
            arr = np.asarray(im, dtype=np.float32)
            scale = 65535.0 if arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8))
        im = im.convert("L" if c == 1 else "RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _palette_is_gray(im: Image.Image) -> bool:
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A mask file -> (H, W) float32 {0, 1} (nonzero pixels are defective), resized by nearest neighbour."""
    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.NEAREST)
        return (np.asarray(im) > 127).astype(np.float32)


def _image_mode_channels(path: Path) -> int:
    with Image.open(path) as im:
        if im.mode in ("1", "L", "I", "I;16", "F"):
            return 1
        if im.mode == "P":
            im.load()
            return 1 if _palette_is_gray(im) else 3
        return 3


def load_samples(samples: Sequence[Sample], size: int | tuple[int, int] | None = None,
                 channels: int | None = None, on_error: str = "skip", name: str = "images") -> ImageSet:
    """Read file records into an ImageSet (labels, masks if any sample is defective, classes = defect
    type index with names in meta["class_names"], "good" first).

    size: (H, W) or int to resize on load; None keeps the first readable image's size (others are
      resized to it with a warning).
    channels: 1 or 3; None = 1 if every readable file is gray, else 3.
    on_error: "skip" (log a warning and drop unreadable files) or "raise" (ValueError naming the file).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if not samples:
        raise ValueError(f"no images to load for {name}")
    target = _size(size)
    readable: list[Sample] = []
    modes: list[int] = []
    for s in samples:
        try:
            modes.append(_image_mode_channels(s.path))
            readable.append(s)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            if on_error == "raise":
                raise ValueError(f"cannot read image {s.path}: {e}") from None
            log.warning("skipping unreadable image %s (%s)", s.path, e)
    if not readable:
        raise ValueError(f"none of the {len(samples)} files of {name} could be read as an image")
    c = channels if channels is not None else (1 if all(m == 1 for m in modes) else 3)
    images, kept = [], []
    for s in readable:
        try:
            arr = read_image(s.path, c, _size(size))
        except (UnidentifiedImageError, OSError, ValueError) as e:  # truncated data fails at load()
            if on_error == "raise":
                raise ValueError(f"cannot read image {s.path}: {e}") from None
            log.warning("skipping unreadable image %s (%s)", s.path, e)
            continue
        if target is None:
            target = arr.shape[1:]
        elif arr.shape[1:] != tuple(target):
            log.warning("resizing %s from %s to %s (pass size= to choose)", s.path, arr.shape[1:], target)
            arr = read_image(s.path, c, target)
        images.append(arr)
        kept.append(s)
    if not kept:
        raise ValueError(f"none of the {len(samples)} files of {name} could be read as an image")
    h, w = target
    class_names = [GOOD] + sorted({s.defect for s in kept if s.defect != GOOD})
    labels = np.array([s.label for s in kept], dtype=np.int64)
    masks = None
    if labels.any():
        missing = [s.path.name for s in kept if s.label == 1 and s.mask_path is None]
        if missing:
            log.warning("%d defective images of %s have no mask (e.g. %s): pixel metrics unavailable",
                        len(missing), name, missing[0])
        else:
            masks = np.zeros((len(kept), h, w), dtype=np.float32)
            for i, s in enumerate(kept):
                if s.mask_path is not None:
                    masks[i] = read_mask(s.mask_path, (h, w))
    return ImageSet(
        images=torch.from_numpy(np.stack(images)),
        labels=torch.from_numpy(labels),
        masks=None if masks is None else torch.from_numpy(masks),
        classes=torch.tensor([class_names.index(s.defect) for s in kept]),
        names=[f"{s.defect}/{s.path.name}" for s in kept],
        meta={"name": name, "class_names": class_names},
    )


def iter_batches(samples: Sequence[Sample], batch_size: int = 64, **load_options) -> Iterator[ImageSet]:
    """Yield ImageSets of at most `batch_size` records each, for sets too big to hold in memory. Pass
    `size=` and `channels=` so every batch has the same shape."""
    for i in range(0, len(samples), batch_size):
        yield load_samples(samples[i : i + batch_size], **load_options)


def load_mvtec(root: str | Path, category: str | None = None, split: str = "test",
               size: int | tuple[int, int] | None = None, channels: int | None = None,
               on_error: str = "skip") -> ImageSet:
    """Load one split of an MVTec-layout category as an ImageSet.

    train: good images, labels 0, masks None. test: labels 0 (good) / 1 (defect), masks (zeros for good),
    classes = defect type index (meta["class_names"], "good" = 0). See `load_samples` for the options.
    """
    samples = list_mvtec(root, category, split)
    base = _category_dir(root, category)
    data = load_samples(samples, size=size, channels=channels, on_error=on_error,
                        name=f"{base.name}/{split}")
    if split == "train":
        data.masks = None
    data.meta.update({"category": base.name, "split": split, "source": str(base)})
    return data


def load_folder(folder: str | Path, size: int | tuple[int, int] | None = None, channels: int | None = None,
                on_error: str = "skip") -> ImageSet:
    """Every image directly in `folder` as normal images (labels 0), e.g. a user's good images for fit."""
    folder = Path(folder)
    data = load_samples([Sample(p) for p in list_images(folder)], size=size, channels=channels,
                        on_error=on_error, name=folder.name)
    data.masks = None
    data.meta.update({"source": str(folder)})
    return data
