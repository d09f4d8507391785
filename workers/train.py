"""Train a CNN from the family and publish it as the next version in the model repository.

The shipped default model ``models/digits/1`` was made by the single-process loop (2 CPU cores,
torch 2.13 CPU build):

    convray train --workers 0 --dataset digits --preset digits-small --epochs 30 --seed 0 \
        --model-repo models --model-name digits

Data-parallel on Ray Train, two CPU workers (``workers/ray_train.py`` starts them):

    convray train --dataset digits --workers 2 --model-repo models --model-name digits

Both run ``train_loop`` below; only its ``Session`` differs (who reports, checkpoints and resumes).
It reads top to bottom: config -> data -> model -> one epoch -> evaluate -> the loop -> publish.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils.data import DistributedSampler

from convray.workers.data import ImageDataset, check_folder, load_dataset
from convray.workers.models import CNN, build_model, parameter_count
from convray.workers.progress import EpochProgress
from convray.workers.repository import (
    InputContract,
    ModelMetadata,
    ModelRepository,
    Normalisation,
    format_validation_error,
)
from convray.workers.spec import PRESETS, CNNSpec
from convray.workers.train_config import TrainConfig, run_settings
from convray.workers.transforms import channel_stats, normalise, random_flip, random_shift


def load_spec(config: TrainConfig, data: ImageDataset | None = None) -> CNNSpec:
    """The spec to train: from ``spec_file`` when given, else the named preset fitted to ``data``.

    Raises:
        ValueError: unknown preset, or a spec file whose channels or classes differ from the data.
    """
    if config.spec_file:
        try:
            text = Path(config.spec_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--spec {config.spec_file}: cannot read it: {exc.strerror or exc}") from None
        try:
            spec = CNNSpec.model_validate_json(text)
        except ValidationError as exc:  # one line naming the file and each field, as a model.json's errors do
            raise ValueError(format_validation_error(Path(config.spec_file), exc)) from None
    elif config.preset in PRESETS:
        spec = CNNSpec.model_validate(PRESETS[config.preset])
        if data is not None:  # a preset is a shape of network; the data decides its ends
            spec = spec.model_copy(update={"in_channels": data.images.shape[1], "num_classes": len(data.label_names)})
    else:
        raise ValueError(f"unknown preset {config.preset!r}; choose from {sorted(PRESETS)}")
    if data is not None and (spec.in_channels, spec.num_classes) != (data.images.shape[1], len(data.label_names)):
        raise ValueError(
            f"spec has {spec.in_channels} channel(s) and {spec.num_classes} classes; "
            f"the data has {data.images.shape[1]} and {len(data.label_names)}"
        )
    return spec


@dataclass(frozen=True)
class TrainingData:
    """What every worker trains on: both splits in memory, the spec, and the input contract."""

    train: ImageDataset
    held_out: ImageDataset
    spec: CNNSpec
    contract: InputContract


def prepare_data(config: TrainConfig) -> TrainingData:
    """Load and split the dataset, pick the spec, and measure the normalisation statistics."""
    train_set, held_out = load_dataset(
        config.dataset, config.held_out_fraction, 0, config.image_size, config.colour_mode
    )
    _, channels, height, width = train_set.images.shape
    norm = channel_stats(train_set.images)
    contract = InputContract(
        channels=channels, height=height, width=width, colour_mode=train_set.colour_mode, normalisation=norm
    )
    spec = load_spec(config, train_set)
    parameter_count(spec, height, width)  # here, not first in every Ray Train worker (each retried max_failures times)
    return TrainingData(train_set, held_out, spec, contract)


MOMENTUM_CYCLE = 0.05  # how far one-cycle moves momentum either side of --momentum


def make_optimizer(config: TrainConfig, model: torch.nn.Module, steps_per_epoch: int) -> tuple[Any, Any]:
    """The optimiser and its per-step learning-rate schedule."""
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=config.max_lr, momentum=config.momentum,
            weight_decay=config.weight_decay, nesterov=True,
        )  # fmt: skip
    elif config.optimizer == "adamw":
        opt = torch.optim.AdamW(
            model.parameters(), lr=config.max_lr, weight_decay=config.weight_decay, betas=(config.momentum, 0.999)
        )
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose 'sgd' or 'adamw'")
    steps = config.epochs * steps_per_epoch
    if config.schedule == "one_cycle":
        # One-cycle also cycles momentum (AdamW's beta1), inversely to the rate, between base and max; centred on
        # --momentum, 0.05 either way (torch's own 0.85 to 0.95 at the default 0.9), so the flag counts here too.
        schedule: Any = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=config.max_lr,
            total_steps=steps,
            base_momentum=round(max(config.momentum - MOMENTUM_CYCLE, 0.0), 6),
            max_momentum=round(min(config.momentum + MOMENTUM_CYCLE, 0.999), 6),
        )
    elif config.schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    elif config.schedule == "constant":
        schedule = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; choose one_cycle, cosine or constant")
    return opt, schedule


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 or fp16 on a GPU when asked; None (full fp32) on CPU, always."""
    if device.type != "cuda" or config.amp == "none":
        return None
    return torch.bfloat16 if config.amp == "bf16" else torch.float16


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, output: Literal["softmax", "sigmoid"], label_smoothing: float
) -> torch.Tensor:
    """The training loss for a head whose ``output`` is ``softmax`` or ``sigmoid``.

    Softmax: cross-entropy over the classes. Sigmoid, whose classes are served as independent probabilities: a
    binary cross-entropy per class against one-vs-rest targets (trained with softmax's loss, the served
    probabilities of a digit summed to about 5).
    """
    if output == "softmax":
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    targets = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    targets = targets * (1 - label_smoothing) + label_smoothing / 2  # smoothed towards 0.5, each class alone
    return F.binary_cross_entropy_with_logits(logits, targets)


def batch_bounds(count: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch of an epoch of ``count`` images; a last batch of one joins the one before.

    Batch norm cannot train on a batch of one image when its map is 1x1 (torch raises at the end of the
    first epoch), and one image makes a noisy step anyway.
    """
    starts = list(range(0, count, batch_size))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    return [(start, stop) for start, stop in zip(starts, [*starts[1:], count], strict=True)]


def train_one_epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    schedule: Any,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    labels: torch.Tensor,
    norm: Normalisation,
    indices: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    batch_size: int,
    output: Literal["softmax", "sigmoid"] = "softmax",
) -> torch.Tensor:
    """One pass over ``indices`` of uint8 ``images`` (N, C, H, W) in batches; returns [loss sum, correct, images]."""
    dtype = amp_dtype(config, device)
    totals = torch.zeros(3, dtype=torch.float64)
    model.train()
    for start, stop in batch_bounds(len(indices), batch_size):
        idx = indices[start:stop]
        x = random_shift(images[idx], config.max_shift_px, generator)  # uint8 (B, C, H, W)
        if config.flip:
            x = random_flip(x, generator)
        x, y = normalise(x.to(device, non_blocking=True), norm.mean, norm.std), labels[idx].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
            loss = classification_loss(logits, y, output, config.label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # a pass-through unless fp16 (GradScaler(enabled=...))
        scaler.step(opt)
        scaler.update()
        schedule.step()
        totals += torch.tensor([loss.item() * len(idx), int((logits.argmax(1) == y).sum()), len(idx)])
    return totals


def evaluate(model: CNN, data: ImageDataset, norm: Normalisation) -> dict[str, Any]:
    """Held-out accuracy, per-class accuracy and the confusion matrix (rows: true, columns: predicted)."""
    model.eval()
    device = next(model.parameters()).device
    predicted = []
    with torch.inference_mode():
        for i in range(0, len(data.labels), 1024):
            # as_tensor copies: arrays from Ray's object store are read-only, which from_numpy warns about
            x = normalise(torch.as_tensor(data.images[i : i + 1024].copy(), device=device), norm.mean, norm.std)
            predicted.append(model(x).argmax(dim=1).cpu().numpy())
    guesses = np.concatenate(predicted)
    classes = len(data.label_names)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (data.labels, guesses), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {
        "accuracy": round(float((guesses == data.labels).mean()), 6),
        "per_class_accuracy": {name: round(float(a), 6) for name, a in zip(data.label_names, per_class, strict=True)},
        "confusion_matrix": confusion.tolist(),
        "held_out_images": int(len(data.labels)),
    }


class Session(Protocol):
    """Where the loop runs: its rank among the workers, and how it reports, checkpoints and resumes."""

    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model to the device (and wrap it for data-parallel training on several workers)."""

    def restore(self) -> dict[str, Any] | None:
        """The last checkpoint's state, or None on a fresh run."""

    def all_reduce(self, totals: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the workers."""

    def report(self, progress: EpochProgress, record: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        """After each epoch: log, and (where checkpoints are kept) save ``state()``."""

    def crash(self, epoch: int) -> None:
        """Die as a crashed worker would, at the start of ``epoch`` (``fail_at_epoch``, for tests)."""


def train_loop(config: TrainConfig, data: TrainingData, session: Session) -> tuple[CNN, list[dict[str, Any]]]:
    """The training loop, the same in one process and on each Ray Train worker.

    Returns:
        The trained model (unwrapped, on its device) and one record per epoch (the training curve).
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    _, _, height, width = data.train.images.shape
    model = build_model(data.spec, height, width)
    wrapped = session.prepare(model)  # DistributedDataParallel over several workers; shares `model`'s weights
    sampler = DistributedSampler(  # this worker's share of each epoch, reshuffled per epoch
        range(len(data.train.labels)), num_replicas=session.world_size, rank=session.rank, seed=config.seed
    )
    batch_size = max(1, config.batch_size // session.world_size)
    opt, schedule = make_optimizer(config, model, steps_per_epoch=len(batch_bounds(len(sampler), batch_size)))
    scaler = torch.amp.GradScaler(session.device.type, enabled=amp_dtype(config, session.device) == torch.float16)
    # A copy: arrays that came through Ray's object store are read-only, which torch warns about.
    images, labels = torch.from_numpy(data.train.images.copy()), torch.from_numpy(data.train.labels.copy())
    history: list[dict[str, Any]] = []
    restored = session.restore()
    if restored is not None:
        model.load_state_dict(restored["model"])
        opt.load_state_dict(restored["optimizer"])
        schedule.load_state_dict(restored["schedule"])
        if restored["scaler"]:  # empty when the run had no fp16 to scale (then a new fp16 scaler starts afresh)
            scaler.load_state_dict(restored["scaler"])
        history = list(restored["history"])

    def state() -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "history": history,
            # the spec too: a --spec file edited between runs keeps its name (ray_train.check_continues_as_started)
            "run": {**run_settings(config), "spec": data.spec.model_dump(mode="json")},
        }

    for epoch in range(len(history) + 1, config.epochs + 1):
        started_before = len(restored["history"]) if restored else 0  # epochs done when this attempt began
        if epoch == config.fail_at_epoch and started_before < epoch - 1 and session.rank == 0:
            session.crash(epoch)  # failure injection (tests): once, not again after restoring epoch - 1
        sampler.set_epoch(epoch)
        epoch_seed = config.seed * 100_003 + epoch * 101 + session.rank
        generator = torch.Generator().manual_seed(epoch_seed)  # augmentation
        # Dropout draws from torch's global generator, which no checkpoint carries: seeded per epoch and rank
        # (apart from the augmentation's), a resumed run draws what an uninterrupted one would, and ranks differ.
        torch.manual_seed(epoch_seed + 7_919)
        started = time.monotonic()
        totals = train_one_epoch(
            wrapped, opt, schedule, scaler, images, labels, data.contract.normalisation,
            torch.tensor(list(sampler)), config, generator, session.device, batch_size, data.spec.output,
        )  # fmt: skip
        loss_sum, correct, seen = session.all_reduce(totals).tolist()
        seconds = time.monotonic() - started
        progress = EpochProgress(epoch, config.epochs, loss_sum / seen, correct / seen, seen / max(seconds, 1e-9))
        record = {"epoch": epoch, "loss": progress.loss, "accuracy": progress.accuracy, "seconds": seconds}
        record["images_per_second"] = progress.images_per_second
        if restored is not None and epoch == len(restored["history"]) + 1:  # where a restart or --resume joined
            record["resumed_after_epoch"] = epoch - 1
        if session.rank == 0:
            record["val_accuracy"] = evaluate(model, data.held_out, data.contract.normalisation)["accuracy"]
        history.append(record)
        session.report(progress, record, state)
    return model, history


class LocalSession:
    """The loop in this process, without Ray: it logs each epoch and keeps no checkpoints."""

    rank, world_size = 0, 1

    def __init__(
        self, config: TrainConfig, log: Callable[[str], Any], on_epoch: Callable[[EpochProgress], None] | None
    ) -> None:
        self.device = torch.device("cuda" if config.gpu and torch.cuda.is_available() else "cpu")
        self._log, self._on_epoch = log, on_epoch

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model to this process's device."""
        return model.to(self.device)

    def restore(self) -> dict[str, Any] | None:
        """Nothing to resume: a local run starts fresh."""
        return None

    def all_reduce(self, totals: torch.Tensor) -> torch.Tensor:
        """One worker: the totals already are the sum."""
        return totals

    def report(self, progress: EpochProgress, record: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        """Log the epoch line and call ``on_epoch``."""
        self._log(epoch_line(record, config_epochs=progress.epochs))
        if self._on_epoch is not None:
            self._on_epoch(progress)

    def crash(self, epoch: int) -> None:
        """Nothing restarts a local run, so the injected failure is an exception."""
        raise RuntimeError(f"failure injected at the start of epoch {epoch}")


def epoch_line(record: dict[str, Any], config_epochs: int) -> str:
    """``epoch  3/30  loss 0.4321  acc 0.9512  val 0.9722  52,000 img/s``."""
    val = f"  val {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
    return (
        f"epoch {record['epoch']:3d}/{config_epochs}  loss {record['loss']:.4f}  acc {record['accuracy']:.4f}"
        f"{val}  {record['images_per_second']:,.0f} img/s"
    )


def finish(
    config: TrainConfig, data: TrainingData, model: CNN, history: list[dict[str, Any]], seconds: float
) -> ModelMetadata:
    """Evaluate the trained model on the held-out split and describe the version to publish."""
    metrics = evaluate(model.cpu(), data.held_out, data.contract.normalisation)
    metrics["train_seconds"] = round(seconds, 2)
    metrics["history"] = [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in history]
    training = {"dataset": config.dataset, "config": asdict(config), "torch": torch.__version__}
    return ModelMetadata(
        spec=data.spec, labels=data.train.label_names, input=data.contract, metrics=metrics, training=training
    )


def _connect_and_prepare_data(config: TrainConfig) -> TrainingData:
    """Join (or start) Ray and prepare the data; in-memory datasets are prepared while Ray starts.

    Called for Ray Train runs (``workers`` > 0) and image folders. Starting an embedded Ray is mostly
    waiting for its processes, so a thread meanwhile splits the data and imports Ray Train (about 1.4 s
    of a run that should take under 20 s). An image folder is read with Ray Data, which needs the
    connection first.
    """
    from convray.workers import cluster

    if config.dataset.startswith("folder:"):
        check_folder(config.dataset.removeprefix("folder:"))  # before Ray starts, not after
        cluster.connect(config.ray_address, log_to_driver=True)
        return prepare_data(config)

    def prepare() -> TrainingData:
        import ray.train.torch  # noqa: F401 (imported now, off the critical path)

        return prepare_data(config)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convray-data") as executor:
        pending = executor.submit(prepare)
        cluster.connect(config.ray_address, log_to_driver=True)
        return pending.result()


def train(
    config: TrainConfig, log: Any = print, on_epoch: Callable[[EpochProgress], None] | None = None
) -> tuple[CNN, ModelMetadata]:
    """Train (in this process when ``config.workers`` is 0, else on Ray Train) and describe the result.

    ``on_epoch`` is called after each epoch with its progress (``convray train --metrics-port`` exports it);
    on Ray Train it runs on the rank-0 worker, so it must pickle.
    """
    started = time.monotonic()
    if config.workers > 0 or config.dataset.startswith("folder:"):  # Ray Train or Ray Data
        data = _connect_and_prepare_data(config)
    else:
        data = prepare_data(config)
    if config.workers == 0:
        model, history = train_loop(config, data, LocalSession(config, log, on_epoch))
    else:
        from convray.workers.ray_train import fit

        model, history = fit(config, data, log, on_epoch)
    return model, finish(config, data, model, history, time.monotonic() - started)


def train_and_publish(
    config: TrainConfig,
    model_repo: Path,
    model_name: str,
    log: Any = print,
    on_epoch: Callable[[EpochProgress], None] | None = None,
) -> Path:
    """Train, then publish the next version of ``model_name`` with its plots; returns the version directory."""
    from convray.workers.plots import confusion_png, curve_png

    repo = ModelRepository(model_repo)
    repo.check_publishable(model_name)  # now, not after the whole run
    if config.workers > 0:
        from convray.workers.ray_train import check_continues_as_started, check_not_published, choose_run_name

        if config.run_name is None:
            config.run_name = choose_run_name(config, model_name)
        check_not_published(config)
        check_continues_as_started(config)
    model, metadata = train(config, log, on_epoch)
    extra_files = {
        "training_curve.png": curve_png(metadata.metrics["history"]),
        "confusion_matrix.png": confusion_png(metadata.metrics["confusion_matrix"], metadata.labels),
    }
    version = repo.publish(model_name, metadata, model, extra_files)
    out = repo.version_dir(model_name, version)
    if config.workers > 0:
        from convray.workers.ray_train import mark_published

        mark_published(config, model_name, version)
    metrics = metadata.metrics
    worst = min(metrics["per_class_accuracy"].items(), key=lambda item: item[1])
    log(
        f"published {out}  held-out accuracy {metrics['accuracy']:.4f} on {metrics['held_out_images']} images  "
        f"(worst class {worst[0]}: {worst[1]:.4f})  in {metrics['train_seconds']:.1f} s"
    )
    return out
