"""What a training loop reports after each epoch (to its log line and, when asked, to metrics)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EpochProgress:
    """One finished epoch of a training run."""

    epoch: int  # 1-based
    epochs: int  # epochs the run will take
    loss: float  # mean training loss over the epoch
    accuracy: float  # training accuracy over the epoch, 0..1
    images_per_second: float
