"""``convray tune``: Ray Tune searches the spec's choices and the optimiser's knobs; the best trial is published.

Each trial is a Ray Train run (``workers.ray_train.trainer``) driven from a Tune function trainable, the
composition Ray Train V2 supports: the trainer's ``TuneReportCallback`` hands every epoch's rank-0
metrics (with the checkpoint path) to Tune. Trials run one at a time by default so each gets the
cluster's workers; the best by held-out accuracy is rebuilt from its last checkpoint and published.

    convray tune --dataset digits --trials 8 --epochs 15 --workers 2 --model-repo models --model-name digits

The held-out split both picks the winner and is reported for it, so its accuracy is optimistic by the
selection; hold a test set back (another ``npz:``) for an unbiased figure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from convray.workers.models import build_model
from convray.workers.ray_train import load_state, trainer
from convray.workers.repository import ModelRepository
from convray.workers.spec import Activation, CNNSpec, ConvBlock, DropoutBlock, FCHead, GAPFCHead, GAPHead, PoolBlock
from convray.workers.train import TrainingData, finish, prepare_data
from convray.workers.train_config import TrainConfig

SEARCHED_KNOBS = ("optimizer", "max_lr", "weight_decay", "label_smoothing")
"""The TrainConfig fields the search draws; one the user set (``--optimizer``, ``--lr``...) is kept, not searched."""


def search_space(fixed: Collection[str] = ()) -> dict[str, Any]:
    """The choices a trial draws from: spec shape (head, pooling, activation, dropout, width) and optimiser.

    ``fixed``: knobs of ``SEARCHED_KNOBS`` the user set, left out of the search.
    """
    from ray import tune

    space = {
        "head": tune.choice(["gap_fc", "gap", "fc"]),
        "pool": tune.choice(["max", "avg"]),
        "activation": tune.choice(["relu", "leaky_relu"]),
        "dropout": tune.choice([0.0, 0.1, 0.25]),
        "width": tune.choice([0.5, 1.0, 2.0]),  # multiplies every conv block's filters
        "optimizer": tune.choice(["sgd", "adamw"]),
        "max_lr": tune.loguniform(1e-3, 0.3),
        "weight_decay": tune.loguniform(1e-5, 1e-3),
        "label_smoothing": tune.choice([0.0, 0.05, 0.1]),
    }
    return {name: choices for name, choices in space.items() if name not in fixed}


def spec_for(base: CNNSpec, choice: dict[str, Any]) -> CNNSpec:
    """``base`` with one trial's head, pooling, activation, dropout and width."""
    activation = Activation(kind=choice["activation"])
    blocks: list[ConvBlock | PoolBlock | DropoutBlock] = []
    for block in base.blocks:
        if isinstance(block, ConvBlock):
            filters = max(1, round(block.filters * choice["width"]))
            blocks.append(block.model_copy(update={"filters": filters, "activation": activation}))
        elif isinstance(block, PoolBlock):
            blocks.append(block.model_copy(update={"kind": choice["pool"]}))
        else:
            blocks.append(block.model_copy(update={"rate": choice["dropout"]}))
    heads = {
        "gap": GAPHead(),
        "gap_fc": GAPFCHead(activation=activation, dropout=choice["dropout"]),
        "fc": FCHead(hidden=[64], activation=activation, dropout=choice["dropout"]),
    }
    return base.model_copy(update={"blocks": blocks, "head": heads[choice["head"]]})


def config_for(base: TrainConfig, choice: dict[str, Any]) -> TrainConfig:
    """``base`` with one trial's optimiser knobs (those it drew: the user's own stay)."""
    return replace(base, **{k: choice[k] for k in SEARCHED_KNOBS if k in choice})


def run_trial(choice: dict[str, Any], base: dict[str, Any], data: TrainingData) -> None:
    """One Tune trial: a Ray Train run of the chosen spec and knobs, reporting each epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = config_for(TrainConfig(**base), choice)
    config.run_name = f"trial-{tune.get_context().get_trial_id()}"
    trial_data = replace(data, spec=spec_for(data.spec, choice))
    trainer(config, trial_data, callbacks=[TuneReportCallback()]).fit()


def tune_and_publish(
    config: TrainConfig,
    trials: int,
    model_repo: Path,
    model_name: str,
    log: Any = print,
    fixed: Collection[str] = (),
) -> Path:
    """Run ``trials`` trials, publish the best by held-out accuracy, and return its version directory.

    ``fixed``: knobs of ``SEARCHED_KNOBS`` the user set; every trial keeps ``config``'s value of them.

    Raises:
        ValueError: no trial finished, or the workers cannot fit an embedded Ray, or the repository is not writable.
    """
    from ray import tune
    from ray.train import Checkpoint

    from convray.workers import cluster
    from convray.workers.plots import confusion_png, curve_png
    from convray.workers.ray_train import FAST_START_ENV, refuse_what_cannot_fit

    for name, value in FAST_START_ENV.items():
        os.environ.setdefault(name, value)
    started = time.monotonic()
    repo = ModelRepository(model_repo)
    repo.check_publishable(model_name)
    cluster.connect(config.ray_address, log_to_driver=True)
    refuse_what_cannot_fit(config)
    data = prepare_data(config)
    search = f"tune-{model_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    config = replace(config, storage_path=str(Path(config.storage_path).resolve() / search))
    tuner = tune.Tuner(
        # A trial's driver only waits on its trainer, whose workers hold the CPUs; it reserves a token of
        # memory instead of a CPU (Tune refuses an empty request), so N workers still fit on N CPUs.
        tune.with_resources(
            tune.with_parameters(run_trial, base=asdict(config), data=data), {"cpu": 0, "memory": 2**20}
        ),
        param_space=search_space(fixed),
        tune_config=tune.TuneConfig(
            num_samples=trials,
            metric="val_accuracy",
            mode="max",
            # One trial at a time, set on the generator itself: Tune ignores `max_concurrent_trials` for a
            # generator (it warns, then runs every trial at once).
            search_alg=tune.search.BasicVariantGenerator(random_state=config.seed, max_concurrent=1),
        ),  # fmt: skip
        run_config=tune.RunConfig(name=search, storage_path=config.storage_path, verbose=0),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="val_accuracy", mode="max", scope="last")
    if best is None or best.metrics is None or "checkpoint_path" not in best.metrics:
        raise ValueError(f"no trial of {search} finished; see {config.storage_path}")
    for result in results:
        if result.metrics:
            trial, accuracy = result.metrics.get("trial_id"), result.metrics["val_accuracy"]
            log(f"trial {trial}: val_accuracy {accuracy:.4f}  {result.config}")
    state = load_state(Checkpoint(best.metrics["checkpoint_path"]))
    best_config = config_for(config, best.config)
    best_data = replace(data, spec=spec_for(data.spec, best.config))
    _, _, height, width = data.train.images.shape
    model = build_model(best_data.spec, height, width)
    model.load_state_dict(state["model"])
    metadata = finish(best_config, best_data, model, state["history"], time.monotonic() - started)
    metadata.training["tune"] = {"trials": trials, "best": best.config, "search": search}
    version = repo.publish(
        model_name,
        metadata,
        model,
        {
            "training_curve.png": curve_png(metadata.metrics["history"]),
            "confusion_matrix.png": confusion_png(metadata.metrics["confusion_matrix"], metadata.labels),
        },
    )
    out = repo.version_dir(model_name, version)
    log(f"published {out}  best of {trials} trials: held-out accuracy {metadata.metrics['accuracy']:.4f}")
    return out
