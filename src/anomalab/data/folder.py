"""Image folders: the MVTec AD layout and plain folders of good images.

MVTec AD layout of one category (the `textures` builder writes the same):

    <root>/<category>/train/good/*.png                 normal training images
    <root>/<category>/test/good/*.png                  normal test images (label 0)
    <root>/<category>/test/<defect>/*.png              anomalous test images (label 1)
    <root>/<category>/ground_truth/<defect>/<name>_mask.png   pixel masks (also accepted: <name>.png)

Images may be grayscale or RGB, of any size. Loading is split in two so big sets can stream: `list_*`
functions return file records only; `load_samples` / `iter_batches` read them into `ImageSet`s.

How a file's pixels become values in [0, 1] (`read_image`), by the file's own type, never by its content:

- 8-bit files (modes 1, L, P, RGB, ...): value / 255.
- 16-bit integer files (modes I;16*, and I from 16-bit PNG/PGM files or TIFFs with 16 bits per sample):
  value / 65535, the type's range, so a dark 16-bit image stays dark. Other 32-bit integer files have no
  fixed range and are refused (DataError): save them as 16-bit or as float.
- float files (mode F, e.g. 32-bit float TIFFs): taken as they are; values must be finite and within
  [0, 1], else the file is refused (DataError naming it and its range): anomalab does not guess a scale.
- alpha (LA, PA, RGBA, palette transparency) is dropped: the stored gray or colour values are used, so a
  file reads the same with or without an alpha channel. Gray+alpha files (LA, PA with a gray palette)
  count as gray.

Channels: a set is gray (1 channel) when every readable file is gray, else RGB (3); gray files in an RGB
set are repeated, never the other way unless `channels=1` is asked (then RGB -> luma).

Size: with `size=None`, `load_samples` uses the most common (H, W) among the files, read from their
headers (ties: the smallest area), so neither file order nor one outsized file decides it; the other files
are resized to it with one warning counting them. Pass `size=` to choose.

Files of more than `MAX_PIXELS` pixels (decompression bombs among them) are refused before decoding, like
any unreadable file: skipped with a warning under `on_error="skip"`, a DataError under `"raise"`.
Pillow's own guard (`PIL.Image.MAX_IMAGE_PIXELS`, an error at twice its value) still applies above that.
A mask that cannot be read, or whose size differs from its image's, is a warning naming it; its image
then counts as having no mask (so the set has no pixel masks).
"""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomalab.errors import DataError, DataNotFoundError, ParameterError
from anomalab.types import ImageSet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
GOOD = "good"
MAX_PIXELS = 100_000_000  # largest image read (width x height); larger files are refused unread

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_HIGH_DEPTH = (*_SIXTEEN_BIT, "I", "F")
_GRAY = ("1", "L", "LA", "La", *_HIGH_DEPTH)
# what Pillow raises for unreadable, truncated or oversized files (decoders differ)
_READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, zlib.error, Image.DecompressionBombError)
_SKIPPABLE = (DataError, DataNotFoundError)


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
    try:
        h, w = (size, size) if isinstance(size, (int, np.integer)) else size
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ParameterError(f"size must be a positive int or (H, W) of positive ints, got {size!r}")
    return (int(h), int(w))


def mvtec_categories(folder: str | Path) -> list[str]:
    """Names of the subfolders of `folder` that are MVTec-layout categories (hold train/good), sorted:
    non-empty when `folder` is a dataset root such as MVTec AD's rather than one category."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and (d / "train" / GOOD).is_dir())


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def subfolders(folder: str | Path) -> list[str]:
    """Names of the visible subfolders of `folder`, sorted (the images in them are not read by `list_images`)."""
    return sorted(d.name for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith("."))


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name. Raises DataNotFoundError for a missing folder
    and DataError for a folder without images (naming the categories when it is an MVTec-layout root, or
    its subfolders when the images lie one level down)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        if (folder / "train" / GOOD).is_dir():
            raise DataError(f"{folder} is an MVTec-layout category, not a folder of images: its good images are "
                            f"in {folder / 'train' / GOOD}")
        categories = mvtec_categories(folder)
        if categories:
            raise DataError(f"{folder} holds MVTec-layout categories ({_names(categories)}), not images: pass one "
                            f"category folder, e.g. {folder / categories[0]}")
        below = subfolders(folder)
        if below:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) directly in {folder}; images in its "
                            f"subfolders ({_names(below)}) are not read: pass one of them, e.g. {folder / below[0]}")
        raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _category_dir(root: str | Path, category: str | None) -> Path:
    base = Path(root) if category is None else Path(root) / category
    if not base.is_dir():
        raise DataNotFoundError(f"dataset folder not found: {base}")
    if not (base / "train").is_dir() and not (base / "test").is_dir():
        raise DataError(f"{base} is not an MVTec-layout category: it has neither train/ nor test/")
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
        raise ParameterError(f"split must be 'train' or 'test', got {split!r}")
    base = _category_dir(root, category)
    split_dir = base / split
    if split == "train":
        return [Sample(p) for p in list_images(split_dir / GOOD)]
    if not split_dir.is_dir():
        raise DataNotFoundError(f"test folder not found: {split_dir}")
    defects = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not defects:
        raise DataError(f"no defect-type folders (good/, <defect>/) in {split_dir}")
    samples: list[Sample] = []
    defects.sort(key=lambda d: d != GOOD)  # good first, then the defect types by name
    for defect in defects:
        for p in list_images(split_dir / defect):
            if defect == GOOD:
                samples.append(Sample(p))
            else:
                samples.append(Sample(p, 1, defect, _find_mask(base, defect, p)))
    return samples


# ---- one file --------------------------------------------------------------------------------------
def _open(path: Path) -> Image.Image:
    """Image.open (header only) under MAX_PIXELS instead of Pillow's global limit and warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except FileNotFoundError:
        raise DataNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as e:  # beyond Pillow's own guard, which is above MAX_PIXELS
        raise DataError(f"cannot read image {path}: {e}") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise DataError(f"cannot read image {path}: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the limit "
                        f"of {MAX_PIXELS / 1e6:g} (anomalab.data.folder.MAX_PIXELS)")
    return im


def _unreadable(path: Path, e: Exception) -> DataError:
    return DataError(f"cannot read image {path}: {e}")


def _palette_is_gray(im: Image.Image) -> bool:
    """Whether every palette entry the image uses is gray (the palette alone answers most files)."""
    palette = np.asarray(im.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    if len(palette) and (palette == palette[:, :1]).all():
        return True
    rgb = np.asarray(im.convert("RGBA"))[..., :3]
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _channels_of(im: Image.Image) -> int:
    if im.mode in _GRAY:
        return 1
    if im.mode in ("P", "PA"):
        return 1 if _palette_is_gray(im) else 3
    return 3


def _sixteen_bit_int(im: Image.Image) -> bool:
    """Mode I holding 16-bit samples: Pillow opens 16-bit PNG and PGM files (and TIFFs with 16 bits per
    sample) as I, 32-bit integer files too."""
    if im.format in ("PNG", "PPM"):
        return True
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    return isinstance(bits, int) and bits <= 16


def _high_depth(im: Image.Image, path: Path) -> np.ndarray:
    """A 16-bit or float gray image -> (H, W) float32 in [0, 1] (see the module docstring's rules)."""
    arr = np.asarray(im).astype(np.float32)
    if im.mode in _SIXTEEN_BIT:
        return arr / 65535.0
    if im.mode == "I":
        if not _sixteen_bit_int(im):
            raise DataError(f"cannot read image {path}: 32-bit integer pixels have no fixed range; "
                            "save it as 8-bit, 16-bit or float in [0, 1]")
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"cannot read image {path}: 16-bit values outside [0, 65535]")
        return arr / 65535.0
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise DataError(f"cannot read image {path}: float pixels must be finite and in [0, 1], got "
                        f"[{lo:.4g}, {hi:.4g}]; anomalab reads float images as they are: rescale the file")
    return arr


def _eight_bit(im: Image.Image, channels: int) -> Image.Image:
    """An 8-bit image as "L" (channels 1) or "RGB" (3), alpha dropped."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")  # palette transparency included, then dropped below
    if im.mode in ("LA", "La"):
        im = im.getchannel(0)
    elif im.mode in ("RGBA", "RGBa"):
        im = im.convert("RGB")
    return im.convert("L" if channels == 1 else "RGB")


def read_image(path: str | Path, channels: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """One file -> (C, H, W) float32 in [0, 1]; C = channels, or 1 for gray files / 3 for colour ones;
    (H, W) = size (bilinear resize), or the file's own. Values follow the file's type (module docstring).
    Raises DataError naming the file when it cannot be read (DataNotFoundError when it is missing)."""
    path = Path(path)
    try:
        with _open(path) as im:
            im.load()
            c = channels if channels is not None else _channels_of(im)
            if im.mode in _HIGH_DEPTH:
                arr = _high_depth(im, path)
                if size is not None and arr.shape != tuple(size):
                    arr = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR),
                                     dtype=np.float32).clip(0.0, 1.0)
                return np.repeat(arr[None], c, axis=0)
            im = _eight_bit(im, c)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (DataError, DataNotFoundError):
        raise
    except _READ_ERRORS as e:  # truncated data fails at load()
        raise _unreadable(path, e) from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def image_info(path: str | Path) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of an image file, from its header (a palette file with colour entries is decoded
    to see whether it uses them). Raises like `read_image`."""
    path = Path(path)
    try:
        with _open(path) as im:
            w, h = im.size
            return _channels_of(im), (h, w)
    except (DataError, DataNotFoundError):
        raise
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None


def read_mask(path: str | Path, size: tuple[int, int], expected: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file -> (H, W) = size float32 {0, 1}, resized by nearest neighbour. A pixel is defective
    above half its type's range (> 127 in an 8-bit mask). expected: the (H, W) of the mask's image file;
    a mask of another size is a DataError, as is an unreadable mask."""
    path = Path(path)
    try:
        with _open(path) as im:
            if expected is not None and im.size != (expected[1], expected[0]):
                raise DataError(f"mask {path} is {im.size[1]}x{im.size[0]} (H x W) but its image is "
                                f"{expected[0]}x{expected[1]}")
            im.load()
            if im.mode in _HIGH_DEPTH:
                binary = (_high_depth(im, path) > 0.5).astype(np.uint8)
            else:
                binary = (np.asarray(_eight_bit(im, 1)) > 127).astype(np.uint8)
    except (DataError, DataNotFoundError):
        raise
    except _READ_ERRORS as e:
        raise DataError(f"cannot read mask {path}: {e}") from None
    if binary.shape != tuple(size):
        binary = np.asarray(Image.fromarray(binary).resize((size[1], size[0]), Image.NEAREST))
    return binary.astype(np.float32)


def common_size(sizes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The most common (H, W); ties go to the smallest area, then the smallest (H, W)."""
    counts = Counter(tuple(s) for s in sizes)
    if not counts:
        raise DataError("no image sizes to choose from")
    return min(counts, key=lambda hw: (-counts[hw], hw[0] * hw[1], hw))


# ---- sets of files ---------------------------------------------------------------------------------
def load_samples(samples: Sequence[Sample], size: int | tuple[int, int] | None = None,
                 channels: int | None = None, on_error: str = "skip", name: str = "images") -> ImageSet:
    """Read file records into an ImageSet (labels, masks if any sample is defective, classes = defect
    type index with names in meta["class_names"], "good" first).

    size: (H, W) or int to resize on load; None = the most common size among the files' headers (ties:
      the smallest area); the others are resized to it, with one warning counting them.
    channels: 1 or 3; None = 1 if every readable file is gray (gray+alpha included), else 3.
    on_error: "skip" (log a warning and drop unreadable files) or "raise" (DataError naming the file).
    A defective sample whose mask cannot be read or has another size than its image is logged and counts
    as having no mask; masks are then None for the whole set (pixel metrics unavailable).
    """
    if on_error not in ("skip", "raise"):
        raise ParameterError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if channels not in (None, 1, 3):
        raise ParameterError(f"channels must be 1, 3 or None, got {channels!r}")
    if not samples:
        raise DataError(f"no images to load for {name}")
    target = _size(size)

    def failed(s: Sample, e: Exception) -> None:
        if on_error == "raise":
            raise e
        log.warning("skipping unreadable image %s (%s)", s.path, e)

    probed: list[tuple[Sample, int, tuple[int, int]]] = []
    for s in samples:
        try:
            probed.append((s, *image_info(s.path)))
        except _SKIPPABLE as e:
            failed(s, e)
    if not probed:
        raise DataError(f"none of the {len(samples)} files of {name} could be read as an image")
    c = channels if channels is not None else (1 if all(pc == 1 for _, pc, _ in probed) else 3)
    if target is None:
        target = common_size(hw for _, _, hw in probed)
    images, kept, native = [], [], []
    for s, _, hw in probed:
        try:
            images.append(read_image(s.path, c, target))
        except _SKIPPABLE as e:  # truncated data fails only when decoded
            failed(s, e)
            continue
        kept.append(s)
        native.append(hw)
    if not kept:
        raise DataError(f"none of the {len(samples)} files of {name} could be read as an image")
    resized = [(s, hw) for s, hw in zip(kept, native) if hw != target]
    if resized and size is None:
        s, hw = resized[0]
        log.warning("resizing %d of %d images of %s to %dx%d (H x W), their most common size (e.g. %s is "
                    "%dx%d); pass size= to choose", len(resized), len(kept), name, *target, s.path.name, *hw)
    h, w = target
    class_names = [GOOD] + sorted({s.defect for s in kept if s.defect != GOOD})
    labels = np.array([s.label for s in kept], dtype=np.int64)
    masks = None
    if labels.any():
        masks = np.zeros((len(kept), h, w), dtype=np.float32)
        missing = []
        for i, (s, hw) in enumerate(zip(kept, native)):
            if s.label != 1:
                continue
            if s.mask_path is None:
                missing.append(s.path.name)
                continue
            try:
                masks[i] = read_mask(s.mask_path, (h, w), expected=hw)
            except _SKIPPABLE as e:
                log.warning("ignoring the mask of %s: %s", s.path, e)
                missing.append(s.path.name)
        if missing:
            log.warning("%d defective images of %s have no usable mask (e.g. %s): pixel metrics unavailable",
                        len(missing), name, missing[0])
            masks = None
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
    `size=` and `channels=` so every batch has the same shape (else each batch chooses its own)."""
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
    """Every image directly in `folder` as normal images (labels 0), e.g. a user's good images for fit.
    Subfolders are not read; one warning names them."""
    folder = Path(folder)
    files = list_images(folder)
    below = subfolders(folder)
    if below:
        log.warning("reading only the %d images directly in %s; its subfolder%s %s %s skipped", len(files), folder,
                    "s" if len(below) > 1 else "", _names(below), "are" if len(below) > 1 else "is")
    data = load_samples([Sample(p) for p in files], size=size, channels=channels, on_error=on_error,
                        name=folder.name)
    data.masks = None
    data.meta.update({"source": str(folder)})
    return data
