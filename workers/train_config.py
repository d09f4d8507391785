"""A training run's settings (``TrainConfig``) and which of them make a run what it is (``RUN_FIELDS``).

Kept apart from ``workers/train.py`` so that reading them, as ``convray train --help`` does for its defaults,
does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

SEARCHED_KNOBS = ("optimizer", "max_lr", "weight_decay", "label_smoothing")
"""The TrainConfig fields ``convray tune`` draws; one set by its flag (``--optimizer``, ``--lr``...) is not searched."""


class TrainingFailed(Exception):
    """A run or search that started and ended without a model to publish: what happened and what to do next."""


@dataclass
class TrainConfig:
    """Every knob of a training run, with its unit."""

    # data
    dataset: str = "digits"  # "digits", "folder:PATH" or "npz:PATH" (workers/data.py)
    held_out_fraction: float = 0.2  # stratified validation split, evaluated every epoch and at the end
    image_size: int | None = None  # folders: resize images to this square size (None: keep, must agree)
    colour_mode: Literal["L", "RGB"] = "RGB"  # folders: what images are converted to
    max_shift_px: int = 1  # random translation (a random crop of the padded image), pixels each way
    flip: bool = False  # random left-right mirror; off for digits, where a mirrored 2 is no 2
    # model
    preset: str = "digits-small"  # a key of workers/spec.py PRESETS, used when spec_file is None
    spec_file: str | None = None  # a JSON CNNSpec, overrides preset
    # optimisation
    epochs: int = 15  # digits: 0.9972 held out at 15 (docs/benchmarks.md); the shipped version used 30
    batch_size: int = 64  # images per optimiser step, over all workers together
    optimizer: Literal["sgd", "adamw"] = "sgd"  # SGD with Nesterov momentum, or AdamW
    schedule: Literal["one_cycle", "cosine", "constant"] = "one_cycle"
    max_lr: float = 0.2  # peak (one_cycle), start (cosine) or only (constant) learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    seed: int = 0
    threads: int = 2  # torch intra-op threads per process
    # Ray Train (workers/ray_train.py); workers=0 runs the loop in this process, without Ray
    workers: int = 2
    ray_address: str | None = None  # a cluster to join ("auto" inside a RayJob); None starts a local Ray
    cpus_per_worker: float = 1.0
    gpu: bool = False  # one GPU per worker
    amp: Literal["none", "bf16", "fp16"] = "none"  # mixed precision, on GPU only
    storage_path: str = "train-runs"  # checkpoints: <storage_path>/<run_name>/checkpoint_*
    run_name: str | None = None  # None: "<model name>-<UTC time>"
    resume: bool = False  # continue the latest run of this model under storage_path
    max_failures: int = 2  # worker-group restarts (from the last checkpoint) before the run fails
    fail_at_epoch: int | None = None  # tests: rank 0 dies at the start of this epoch (once: not after resuming)

    def __post_init__(self) -> None:
        """Refuse values no run can use, before anything trains.

        On Ray Train workers they would fail each worker in turn, retried ``max_failures`` times, and some
        (no epochs) would publish an untrained model.

        Raises:
            ValueError: naming every such value.
        """
        problems = [
            message
            for bad, message in (
                (self.epochs < 1, f"epochs must be >= 1, got {self.epochs}"),
                (self.batch_size < 1, f"batch size must be >= 1, got {self.batch_size}"),
                (not 0 < self.max_lr < math.inf, f"learning rate must be > 0 and finite, got {self.max_lr}"),
                (not 0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
                (not 0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
                (
                    not 0 <= self.weight_decay < math.inf,
                    f"weight decay must be >= 0 and finite, got {self.weight_decay}",
                ),
                (self.max_shift_px < 0, f"max shift must be >= 0 pixels, got {self.max_shift_px}"),
                (self.threads < 1, f"threads must be >= 1, got {self.threads}"),
                (self.workers < 0, f"workers must be >= 0, got {self.workers}"),
                (
                    not 0 < self.cpus_per_worker < math.inf,
                    f"CPUs per worker must be > 0 and finite, got {self.cpus_per_worker}",
                ),
                (self.max_failures < 0, f"max failures must be >= 0, got {self.max_failures}"),
                (
                    not 0 < self.held_out_fraction < 1,
                    f"held-out fraction must be in (0, 1), got {self.held_out_fraction}",
                ),
                (self.resume and self.workers == 0, "--resume continues a Ray Train run's checkpoints: --workers >= 1"),
                (
                    self.gpu and self.workers == 0 and not _cuda_available(),
                    "--gpu with --workers 0 trains in this process, which sees no CUDA device",
                ),
                (
                    "://" in self.storage_path,
                    f"--storage-path must be a local or mounted directory (shared storage on a cluster), got "
                    f"{self.storage_path!r}: resuming and the run checks read it as files",
                ),
            )
            if bad
        ]
        if problems:
            raise ValueError("; ".join(problems))


# The settings a run's course depends on. Its checkpoints carry them: a run resumed with one changed would not
# be that run continued (the optimiser and schedule come from the checkpoint, so a new learning rate would be
# ignored, and a one-cycle schedule stepped past its end fails), so it is refused; --resume takes the run's own
# where no flag is given. The worker count is one of them: it sets the steps per epoch (each worker's share of
# the batch is rounded down). Devices, mixed precision and threads may change.
RUN_FIELDS = (
    "dataset", "held_out_fraction", "image_size", "colour_mode", "max_shift_px", "flip", "preset", "spec_file",
    "epochs", "batch_size", "optimizer", "schedule", "max_lr", "momentum", "weight_decay", "label_smoothing", "seed",
    "workers",
)  # fmt: skip


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """The values of ``RUN_FIELDS`` in ``config``, as a checkpoint keeps them."""
    return {field: getattr(config, field) for field in RUN_FIELDS}


def changed_run_settings(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Each ``RUN_FIELDS`` setting whose value in ``config`` differs from ``saved``, as 'name: run's -> now'."""
    now = run_settings(config)
    differ = [field for field in RUN_FIELDS if field in saved and saved[field] != now[field]]
    if saved.get("spec_file") and now["spec_file"]:  # a spec file overrides the preset, which then does not count
        differ = [field for field in differ if field != "preset"]
        if "spec" in saved:  # its contents are compared (check_continues_as_started), so not how its path is spelt
            differ = [field for field in differ if field != "spec_file"]
    return [f"{field}: {saved[field]!r} -> {now[field]!r}" for field in differ]


def _cuda_available() -> bool:
    import torch  # only for --gpu with --workers 0: the rest of this module stays free of torch

    return torch.cuda.is_available()
