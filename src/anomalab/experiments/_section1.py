"""Shared set-up of the METHODS.md section 1 experiments (seed 002): one MNIST split, cached models.

The source encodes the 10,000 unseen MNIST test digits. With the 5,000 packaged digits we train on a
stratified 80 % (4,000) and treat the other 1,000 as the unseen digits; `--mnist-root` uses the IDX files
instead (60,000 train / 10,000 test, as in the source).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from anomalab.data.mnist import load_mnist
from anomalab.registry import create, load
from anomalab.types import ImageSet

EPOCHS = 30  # full passes over the training digits
BATCH_SIZE = 128
SEED = 0


def parser(description: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=f"runs/{out}", help="output folder (figures, results.json)")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--mnist-root", default=None, help="folder with the MNIST IDX files (default: 5,000 digits)")
    p.add_argument("--models", default="runs/section1_models", help="cache of trained models")
    return p


def split(mnist_root: str | None, seed: int) -> tuple[ImageSet, ImageSet]:
    """(training digits, unseen digits), both with classes = digit."""
    if mnist_root:
        return load_mnist(mnist_root, "train"), load_mnist(mnist_root, "test")
    ds = load_mnist()
    rng = np.random.default_rng(seed)
    classes = ds.classes.numpy()
    unseen = np.concatenate([rng.permutation(np.flatnonzero(classes == d))[:100] for d in range(10)])
    seen = np.setdiff1d(np.arange(len(ds)), unseen)
    return ds.subset(seen), ds.subset(np.sort(unseen))


def model(kind: str, latent_dim: int, train: ImageSet, args) -> object:
    """A fitted conv_ae/vae, loaded from the cache when the same settings were trained before."""
    data_tag = "idx" if args.mnist_root else "pkg"
    path = Path(args.models) / f"{kind}-z{latent_dim}-e{args.epochs}-s{args.seed}-{data_tag}"
    if (path / "detector.json").is_file():
        return load(path)
    det = create(kind, latent_dim=latent_dim, epochs=args.epochs, batch_size=BATCH_SIZE, seed=args.seed)
    det.fit(train)
    det.save(path)
    return det


def write_results(out: Path, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path
