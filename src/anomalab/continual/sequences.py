"""Task sequences for continual learning: normal data arriving as tasks D_1..D_N, one at a time.

A `TaskSequence` holds the training images of each task, held-out normal images of each task (never
trained on) and the anomalies, so that after task i the test set is "held-out normals of tasks 1..i
versus the anomalies" (Wiewel & Yang 2019; docs/continual.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalab.types import ImageSet


@dataclass
class TaskSequence:
    """tasks[i]: training images of task i (normal only); tests[i]: held-out normals of task i or None;
    anomalies: anomalous test images or None; names[i]: a short name of task i (e.g. the digit)."""

    tasks: list[ImageSet]
    tests: list[ImageSet | None] = field(default_factory=list)
    anomalies: ImageSet | None = None
    names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("a task sequence needs at least one task")
        if not self.tests:
            self.tests = [None] * len(self.tasks)
        if len(self.tests) != len(self.tasks):
            raise ValueError(f"{len(self.tasks)} tasks but {len(self.tests)} test sets")
        if not self.names:
            self.names = [f"task{i + 1}" for i in range(len(self.tasks))]

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def test_after(self, i: int) -> ImageSet:
        """Test set after finishing task i (0-based): held-out normals of tasks 0..i (label 0) and all
        anomalies (label 1); `classes` keep the task index of each normal and -1 for anomalies."""
        if self.anomalies is None or any(t is None for t in self.tests[: i + 1]):
            raise ValueError("this sequence has no held-out test images")
        parts = []
        for k in range(i + 1):
            part = self.tests[k].subset(np.arange(len(self.tests[k])))
            part.labels = torch.zeros(len(part), dtype=torch.long)
            part.classes = torch.full((len(part),), k, dtype=torch.long)
            parts.append(part)
        anomalies = self.anomalies.subset(np.arange(len(self.anomalies)))
        anomalies.labels = torch.ones(len(anomalies), dtype=torch.long)
        anomalies.classes = torch.full((len(anomalies),), -1, dtype=torch.long)
        meta = {**self.meta, "name": f"{self.meta.get('name', 'sequence')}-after-{self.names[i]}"}
        return ImageSet.concat(parts + [anomalies], meta=meta)


def mnist_digit_sequence(dataset: ImageSet | None = None, normal_digits: Sequence[int] = range(1, 10),
                         anomaly_digit: int = 0, test_frac: float = 0.2, seed: int = 0,
                         test_dataset: ImageSet | None = None) -> TaskSequence:
    """The built-in sequence of the source: task i = digit normal_digits[i]; digit `anomaly_digit` is the
    anomaly and never trains.

    Without `test_dataset`: each normal digit's images are shuffled with `seed` and `test_frac` of them
    are held out (never trained on) as that task's test normals; ALL images of the anomaly digit are
    test anomalies. dataset default: `load_mnist()` (5,000 digits: 400 train / 100 test per digit,
    500 anomalies). With `test_dataset` (e.g. the 10,000 MNIST test digits): every training image of a
    normal digit trains, test normals and anomalies come from `test_dataset`."""
    if dataset is None:
        from anomalab.data.mnist import load_mnist

        dataset = load_mnist()
    if not 0 < test_frac < 1:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    normal_digits = [int(d) for d in normal_digits]
    if anomaly_digit in normal_digits:
        raise ValueError(f"the anomaly digit {anomaly_digit} is also a normal task")
    for ds in (dataset, test_dataset):
        if ds is None:
            continue
        if ds.classes is None:
            raise ValueError("mnist_digit_sequence needs datasets with classes (digits)")
        missing = sorted(set([*normal_digits, anomaly_digit]) - set(ds.classes.tolist()))
        if missing:
            raise ValueError(f"digits {missing} are not in the dataset {ds.meta.get('name', '')}")
    classes = dataset.classes.numpy()
    rng = np.random.default_rng(seed)
    tasks, tests = [], []
    for d in normal_digits:
        idx = np.flatnonzero(classes == d)
        if test_dataset is None:
            idx = idx[rng.permutation(len(idx))]
            n_test = max(1, int(round(test_frac * len(idx))))
            train, test = dataset.subset(np.sort(idx[n_test:])), dataset.subset(np.sort(idx[:n_test]))
        else:
            train = dataset.subset(idx)
            test = test_dataset.subset(np.flatnonzero(test_dataset.classes.numpy() == d))
        train.labels = torch.zeros(len(train), dtype=torch.long)
        train.meta = {**dataset.meta, "split": "train", "digit": d}
        test.meta = {**test.meta, "split": "test", "digit": d}
        tasks.append(train)
        tests.append(test)
    pool = dataset if test_dataset is None else test_dataset
    anomalies = pool.subset(np.flatnonzero(pool.classes.numpy() == anomaly_digit))
    meta = {"name": f"{dataset.meta.get('name', 'mnist')}-continual", "normal_digits": normal_digits,
            "anomaly_digit": int(anomaly_digit), "seed": seed,
            "split": "held-out fraction" if test_dataset is None else "test set",
            "test_frac": test_frac if test_dataset is None else None}
    return TaskSequence(tasks=tasks, tests=tests, anomalies=anomalies,
                        names=[str(d) for d in normal_digits], meta=meta)


def folder_sequence(folders: Sequence[str | Path], loader: Callable[[Path], ImageSet] | None = None,
                    test_folders: Sequence[str | Path] | None = None,
                    anomaly_folder: str | Path | None = None) -> TaskSequence:
    """A sequence of image folders, one task each, in the given order (real use: a new product variant
    per folder). `loader(path) -> ImageSet` reads one folder (default: `anomalab.data.folder`);
    optional held-out normals per task and a folder of anomalies make `test_after` available."""
    if loader is None:
        from anomalab.data.folder import load_folder as loader
    tasks = [loader(Path(f)) for f in folders]
    tests = [loader(Path(f)) for f in test_folders] if test_folders else []
    anomalies = loader(Path(anomaly_folder)) if anomaly_folder else None
    return TaskSequence(tasks=tasks, tests=tests, anomalies=anomalies, names=[Path(f).name for f in folders],
                        meta={"name": "folders", "folders": [str(f) for f in folders]})
