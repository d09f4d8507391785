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

import json
import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from convray.workers.models import build_model
from convray.workers.progress import EpochProgress, SearchProgress
from convray.workers.ray_train import STATE_FILE, checkpoint_name, first_cause, load_state, run_path, trainer
from convray.workers.repository import ModelRepository
from convray.workers.spec import Activation, CNNSpec, ConvBlock, DropoutBlock, FCHead, GAPFCHead, GAPHead, PoolBlock
from convray.workers.train import TrainingData, finish, prepare_data
from convray.workers.train_config import SEARCHED_KNOBS, TrainConfig, TrainingFailed

logger = logging.getLogger(__name__)  # not `log`: the functions below take a `log` that prints
EPOCH_RESULT_KEYS = frozenset({"epoch", "loss", "accuracy", "images_per_second", "val_accuracy"})  # rank 0's report
TRIAL_RUN_PREFIX = "trial-"  # a trial's Ray Train run is named trial-<Tune's trial id>
CHOICE_FILE = "choice.json"  # in each trial's Ray Train run directory: the spec and knobs it drew


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
    config.run_name = f"{TRIAL_RUN_PREFIX}{tune.get_context().get_trial_id()}"
    run_dir = run_path(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CHOICE_FILE).write_text(json.dumps(choice), encoding="utf-8")  # what best_finished rebuilds it from
    trial_data = replace(data, spec=spec_for(data.spec, choice))
    trainer(config, trial_data, callbacks=[TuneReportCallback()]).fit()


def tune_and_publish(
    config: TrainConfig,
    trials: int,
    model_repo: Path,
    model_name: str,
    log: Any = print,
    fixed: Collection[str] = (),
    progress: SearchProgress | None = None,
) -> Path:
    """Run ``trials`` trials, publish the best by held-out accuracy, and return its version directory.

    ``fixed``: knobs of ``SEARCHED_KNOBS`` the user set; every trial keeps ``config``'s value of them.
    ``progress`` is told of each trial and epoch as Tune receives them, in this process.

    Raises:
        ValueError: the workers cannot fit an embedded Ray, or the repository is not writable.
        TrainingFailed: the search was interrupted, or no trial finished its epochs.
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
    storage = Path(config.storage_path).resolve() / search  # the trials' Ray Train runs, and Tune's own state
    config = replace(config, storage_path=str(storage))
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
        run_config=tune.RunConfig(
            name=search,
            storage_path=str(storage.parent),
            verbose=0,
            callbacks=[] if progress is None else [progress_callback(progress, config.epochs, storage)],
        ),
    )
    results = tuner.fit()  # returns, rather than raises, when trials fail or Ctrl-C stops the search
    best = best_finished(results, trials, config.epochs, search, storage, log)
    state = load_state(Checkpoint(str(best.checkpoint)))
    best_config = config_for(config, best.choice)
    best_data = replace(data, spec=spec_for(data.spec, best.choice))
    _, _, height, width = data.train.images.shape
    model = build_model(best_data.spec, height, width)
    model.load_state_dict(state["model"])
    metadata = finish(best_config, best_data, model, state["history"], time.monotonic() - started)
    metadata.training["tune"] = {"trials": trials, "best": best.choice, "search": search}
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


def progress_callback(progress: SearchProgress, epochs: int, storage_path: Path) -> Any:
    """A Ray Tune callback (run by the search's driver) that tells ``progress`` of each trial and epoch.

    Tune sometimes never receives a trial's last epoch (see ``best_finished``); when a trial ends without it,
    the epoch is read from the trial's last checkpoint under ``storage_path``, as ``best_finished`` reads it.
    """
    from ray import tune

    class ReportProgress(tune.Callback):  # Tune passes iteration, trials, trial (and result) by keyword
        def __init__(self, progress: SearchProgress) -> None:  # an argument: a closure's cell would be pickled
            self.progress: SearchProgress | None = progress
            self.started = self.last_epoch = 0

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its callbacks into the search's tuner.pkl; metrics (locks, a server) cannot be, and a
            # restored search has no port to report to (found by hand: `convray tune --metrics-port` failed).
            return {**self.__dict__, "progress": None}

        def on_trial_start(self, **info: Any) -> None:
            self.started, self.last_epoch = self.started + 1, 0
            self.tell(lambda progress: progress.trial_started(self.started))

        def on_trial_result(self, result: dict, **info: Any) -> None:
            self.tell(lambda progress: self.report(progress, result))

        def on_trial_complete(self, trial: Any, **info: Any) -> None:
            if self.last_epoch != epochs:  # the last epoch never reached Tune: read it as best_finished does
                run = storage_path / f"{TRIAL_RUN_PREFIX}{trial.trial_id}"
                self.tell(lambda progress: self.report(progress, last_epoch_record(run, epochs) or {}))

        def on_trial_error(self, **info: Any) -> None:
            self.tell(lambda progress: progress.trial_failed())

        def tell(self, what: Callable[[SearchProgress], None]) -> None:
            """Run ``what`` on the progress, if any, logging an error instead of raising it.

            Raised in a hook, it would stop the search (on a result) or mark a finished trial failed.
            """
            if self.progress is None:
                return
            try:
                what(self.progress)
            except Exception as exc:  # noqa: BLE001 (gauges are a side channel)
                logger.warning("search progress not reported (%s: %s)", type(exc).__name__, exc)

        def report(self, progress: SearchProgress, record: dict[str, Any]) -> None:
            if not EPOCH_RESULT_KEYS <= record.keys():
                return  # not an epoch of ours (Tune's own last result, or no checkpoint)
            self.last_epoch = record["epoch"]
            epoch = EpochProgress(
                record["epoch"], epochs, record["loss"], record["accuracy"], record["images_per_second"]
            )
            progress.epoch_finished(epoch, record["val_accuracy"])

    return ReportProgress(progress)


def last_epoch_record(run: Path, epochs: int) -> dict[str, Any] | None:
    """The last epoch's record (loss, accuracies, ...) from a trial's Ray Train run, or None if it saved none.

    Raises:
        Exception: the checkpoint is there but cannot be read (a copy cut short by a dying worker).
    """
    from ray.train import Checkpoint

    last = run / checkpoint_name(epochs)
    if not (last / STATE_FILE).is_file():
        return None
    record: dict[str, Any] = load_state(Checkpoint(str(last)))["history"][-1]
    return record


@dataclass(frozen=True)
class FinishedTrial:
    """A trial whose Ray Train run saved its last epoch's checkpoint: what it drew, and how well it did."""

    trial_id: str
    choice: dict[str, Any]
    checkpoint: Path
    val_accuracy: float


def best_finished(
    results: Any, trials: int, epochs: int, search: str, storage_path: Path, log: Any = print
) -> FinishedTrial:
    """The best trial by held-out accuracy among those that ran all ``epochs`` and did not fail; each is logged.

    What a trial finished is read from its Ray Train run under ``storage_path`` (its last epoch's checkpoint),
    not from Tune's results, which fall short in two ways (found in review):

    - ``get_best_result`` also ranks trials that failed or were stopped part-way, and Ctrl-C makes
      ``Tuner.fit`` return normally;
    - a trial's last epoch, handed to Tune through ``TuneReportCallback``'s one-slot queue, is sometimes lost
      when the trial ends first (in 4 of 8 two-trial searches here): Tune then holds the epoch before, with its
      checkpoint, which was published as the trial's.

    Raises:
        TrainingFailed: the search was interrupted (a trial that did not fail has no finished run: it was stopped
            part-way or never started), or no trial finished. Nothing is published then.
    """
    failed = set()
    for result in results:
        if result.error is not None:
            trial = (result.metrics or {}).get("trial_id", "?")
            failed.add(trial)
            log(f"trial {trial}: failed: {first_cause(result.error)}  {result.config}")
    finished, unreadable = [], 0
    for run in sorted(storage_path.glob(f"{TRIAL_RUN_PREFIX}*")):
        trial_id, last = run.name.removeprefix(TRIAL_RUN_PREFIX), run / checkpoint_name(epochs)
        # A trial that failed after saving its last epoch is counted once, as failed: counted as finished too, it
        # would hide an interrupted trial from the sum below (found in review).
        if trial_id in failed or not (run / CHOICE_FILE).is_file():
            continue
        try:
            record = last_epoch_record(run, epochs)
            if record is None:
                continue
            choice, accuracy = json.loads((run / CHOICE_FILE).read_text(encoding="utf-8")), record["val_accuracy"]
        except Exception as exc:  # noqa: BLE001 (a copy cut short by a dying worker: that trial did not finish)
            log(f"trial {trial_id}: its last checkpoint cannot be read ({exc}); left out")
            unreadable += 1
            continue
        finished.append(FinishedTrial(trial_id, choice, last, accuracy))
        log(f"trial {trial_id}: val_accuracy {accuracy:.4f}  {choice}")
    # Ctrl-C stops the running trial and marks it TERMINATED like a finished one, and leaves the rest unstarted
    # (found in review): every trial that did not fail must have a run that finished.
    unfinished = trials - results.num_errors - len(finished) - unreadable
    if unfinished > 0:
        raise TrainingFailed(
            f"search {search} was interrupted: {unfinished} of {trials} trials did not run to the end (stopped, "
            f"or never started); nothing published (its trials are under {storage_path})"
        )
    if not finished:
        raise TrainingFailed(f"no trial of search {search} finished; nothing published (see {storage_path})")
    if len(finished) < trials:
        log(f"{trials - len(finished)} of {trials} trials failed; the best of the {len(finished)} that finished wins")
    return max(finished, key=lambda trial: trial.val_accuracy)
