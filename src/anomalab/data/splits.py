"""One-class protocols: which classes are normal, what trains, what tests."""

from __future__ import annotations

import numpy as np
import torch

from anomalab.types import ImageSet


def one_class_split(dataset: ImageSet, anomaly_digit: int, train_frac: float = 0.8,
                    seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """GANomaly-paper protocol: class `anomaly_digit` is anomalous, all others normal. The normal
    images are shuffled with `seed`; `train_frac` of them train, the rest test together with ALL
    images of the anomalous class. Returns (train with labels 0, test with labels 0/1)."""
    if dataset.classes is None:
        raise ValueError("one_class_split needs a dataset with classes (e.g. MNIST digits)")
    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    classes = dataset.classes.numpy()
    if anomaly_digit not in set(classes.tolist()):
        raise ValueError(f"class {anomaly_digit} is not in the dataset (classes {sorted(set(classes))})")
    normal = np.flatnonzero(classes != anomaly_digit)
    anomalous = np.flatnonzero(classes == anomaly_digit)
    normal = normal[np.random.default_rng(seed).permutation(len(normal))]
    n_train = int(round(train_frac * len(normal)))
    train_idx, test_normal = normal[:n_train], normal[n_train:]
    test_idx = np.concatenate([test_normal, anomalous])
    meta = {**dataset.meta, "anomaly_class": int(anomaly_digit), "seed": seed, "train_frac": train_frac}
    train = dataset.subset(train_idx)
    train.labels = torch.zeros(len(train), dtype=torch.long)
    train.meta = {**meta, "split": "train"}
    test = dataset.subset(test_idx)
    test.labels = torch.as_tensor((classes[test_idx] == anomaly_digit).astype(np.int64))
    test.meta = {**meta, "split": "test"}
    return train, test


def class_subset(dataset: ImageSet, keep: list[int]) -> ImageSet:
    """The images whose class is in `keep`."""
    if dataset.classes is None:
        raise ValueError("class_subset needs a dataset with classes")
    return dataset.subset(np.isin(dataset.classes.numpy(), keep))
