"""Continual learning for anomaly detection (docs/continual.md): normal data arrive as tasks and a
trainable detector is updated with each new task, with a strategy against forgetting the earlier ones."""

from anomalab.continual.learner import ContinualLearner
from anomalab.continual.sequences import TaskSequence, folder_sequence, mnist_digit_sequence
from anomalab.continual.strategies import (
    EWC,
    STRATEGIES,
    Finetune,
    Joint,
    Replay,
    Strategy,
    StrategyError,
    diagonal_fisher,
    ewc_penalty,
    make_strategy,
)

__all__ = [
    "EWC",
    "STRATEGIES",
    "ContinualLearner",
    "Finetune",
    "Joint",
    "Replay",
    "Strategy",
    "StrategyError",
    "TaskSequence",
    "diagonal_fisher",
    "ewc_penalty",
    "folder_sequence",
    "make_strategy",
    "mnist_digit_sequence",
]
