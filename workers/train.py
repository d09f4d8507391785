"""Train a CNN from the family and publish it as the next version in the model repository.

The shipped default model ``models/digits/1`` was made by exactly this command (2 CPU cores, torch
2.13 CPU build):

    convray train --dataset digits --preset digits-small --epochs 30 --seed 0 \
        --model-repo models --model-name digits

This is the single-process loop; issue #8 runs the same loop data-parallel on Ray Train.
It reads top to bottom: config -> data -> model -> loop -> evaluate -> publish.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convray.workers.data import ImageDataset, load_digits_split
from convray.workers.models import CNN, build_model
from convray.workers.progress import EpochProgress
from convray.workers.repository import InputContract, ModelMetadata, ModelRepository, Normalisation
from convray.workers.spec import CNNSpec
from convray.workers.transforms import normalise

PRESETS: dict[str, dict[str, Any]] = {
    # ~25k parameters; 8x8 grey digits -> 10 classes; ~100 KB of weights.
    "digits-small": {
        "in_channels": 1,
        "blocks": [
            {"type": "conv", "filters": 32, "kernel_size": 3, "padding": "same", "batch_norm": True},
            {"type": "conv", "filters": 32, "kernel_size": 3, "padding": "same", "batch_norm": True},
            {"type": "pool", "kind": "max", "window": 2},
            {"type": "conv", "filters": 64, "kernel_size": 3, "padding": "same", "batch_norm": True},
            {"type": "pool", "kind": "max", "window": 2},
            {"type": "dropout", "rate": 0.1},
        ],
        "head": {"type": "gap_fc", "hidden": []},
        "num_classes": 10,
        "output": "softmax",
    },
}


@dataclass
class TrainConfig:
    """Every knob of a training run, with its unit."""

    dataset: str = "digits"  # only "digits" here; folders and .npz arrive with issue #8
    preset: str = "digits-small"  # a key of PRESETS, used when spec_file is None
    spec_file: str | None = None  # a JSON CNNSpec, overrides preset
    epochs: int = 30
    batch_size: int = 64  # images per optimiser step
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adamw"
    max_lr: float = 0.2  # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    max_shift_px: int = 1  # random translation augmentation, in pixels each way
    seed: int = 0
    threads: int = 2  # torch intra-op threads


def load_spec(config: TrainConfig) -> CNNSpec:
    """The spec to train: from ``spec_file`` when given, else the named preset."""
    if config.spec_file:
        return CNNSpec.model_validate_json(Path(config.spec_file).read_text(encoding="utf-8"))
    if config.preset not in PRESETS:
        raise ValueError(f"unknown preset {config.preset!r}; choose from {sorted(PRESETS)}")
    return CNNSpec.model_validate(PRESETS[config.preset])


def channel_stats(images: np.ndarray) -> Normalisation:
    """Per-channel mean and std of uint8 images (N, C, H, W), on the 0..1 scale."""
    scaled = images.astype(np.float64) / 255.0
    return Normalisation(
        mean=[round(float(m), 6) for m in scaled.mean(axis=(0, 2, 3))],
        std=[round(float(s), 6) for s in scaled.std(axis=(0, 2, 3))],
    )


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y, filling with zeros."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channels, rows, cols]


def evaluate(model: CNN, data: ImageDataset, norm: Normalisation) -> dict[str, Any]:
    """Held-out accuracy, per-class accuracy and the confusion matrix (rows: true, columns: predicted)."""
    model.eval()
    with torch.inference_mode():
        x = normalise(torch.from_numpy(data.images), norm.mean, norm.std)
        predicted = model(x).argmax(dim=1).numpy()
    classes = len(data.label_names)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (data.labels, predicted), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {
        "accuracy": round(float((predicted == data.labels).mean()), 6),
        "per_class_accuracy": {name: round(float(a), 6) for name, a in zip(data.label_names, per_class, strict=True)},
        "confusion_matrix": confusion.tolist(),
        "held_out_images": int(len(data.labels)),
    }


def train(
    config: TrainConfig, log: Any = print, on_epoch: Callable[[EpochProgress], None] | None = None
) -> tuple[CNN, ModelMetadata]:
    """Train on the configured dataset and return the model and its metadata (not yet published).

    ``on_epoch`` is called after each epoch with its progress (``convray train --metrics-port`` exports it).
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    generator = torch.Generator().manual_seed(config.seed)

    # data
    if config.dataset != "digits":
        raise ValueError(f"unknown dataset {config.dataset!r}; this build trains on 'digits'")
    train_set, held_out = load_digits_split()
    norm = channel_stats(train_set.images)
    _, _, height, width = train_set.images.shape
    contract = InputContract(channels=1, height=height, width=width, colour_mode="L", normalisation=norm)

    # model and optimiser
    spec = load_spec(config)
    model = build_model(spec, height, width)
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.max_lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=True,
        )
    elif config.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=config.max_lr, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose 'sgd' or 'adamw'")
    steps_per_epoch = -(-len(train_set.labels) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.max_lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
    )

    # loop: the whole data set fits in memory as one tensor, so batches are index slices
    images = torch.from_numpy(train_set.images)
    labels = torch.from_numpy(train_set.labels)
    started = time.monotonic()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        total_loss, seen, correct, epoch_start = 0.0, 0, 0, time.monotonic()
        for i in range(0, len(order), config.batch_size):
            idx = order[i : i + config.batch_size]
            x = normalise(random_shift(images[idx], config.max_shift_px, generator), norm.mean, norm.std)
            logits = model(x)
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
            correct += int((logits.detach().argmax(dim=1) == labels[idx]).sum())
        rate = seen / max(time.monotonic() - epoch_start, 1e-9)
        progress = EpochProgress(epoch, config.epochs, total_loss / seen, correct / seen, rate)
        accuracy = progress.accuracy
        log(f"epoch {epoch:3d}/{config.epochs}  loss {progress.loss:.4f}  acc {accuracy:.4f}  {rate:,.0f} img/s")
        if on_epoch is not None:
            on_epoch(progress)

    # evaluate
    metrics = evaluate(model, held_out, norm)
    metrics["train_seconds"] = round(time.monotonic() - started, 2)
    metadata = ModelMetadata(
        spec=spec,
        labels=train_set.label_names,
        input=contract,
        metrics=metrics,
        training={"dataset": config.dataset, "config": asdict(config), "torch": torch.__version__},
    )
    return model, metadata


def train_and_publish(
    config: TrainConfig,
    model_repo: Path,
    model_name: str,
    log: Any = print,
    on_epoch: Callable[[EpochProgress], None] | None = None,
) -> Path:
    """Train, then publish the next version of ``model_name``; returns the new version directory."""
    model, metadata = train(config, log, on_epoch)
    repo = ModelRepository(model_repo)
    version = repo.publish(model_name, metadata, model)
    out = repo.version_dir(model_name, version)
    log(f"published {out}  held-out accuracy {metadata.metrics['accuracy']:.4f}")
    return out
