"""What a training run reports after each epoch and a search after each trial, to its log and to metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class EpochProgress:
    """One finished epoch of a training run."""

    epoch: int  # 1-based
    epochs: int  # epochs the run will take
    loss: float  # mean training loss over the epoch
    accuracy: float  # training accuracy over the epoch, 0..1
    images_per_second: float


class SearchProgress(Protocol):
    """What a hyperparameter search reports as it goes (``convray tune --metrics-port`` exports it)."""

    def trial_started(self, number: int) -> None:
        """Trial ``number`` (1-based) has started; trials run one at a time."""

    def epoch_finished(self, progress: EpochProgress, val_accuracy: float) -> None:
        """The running trial finished an epoch, with this held-out accuracy."""

    def trial_failed(self) -> None:
        """The running trial failed (it is left out of the search)."""
