"""``train_loop`` on Ray Train (V2): a TorchTrainer with one model replica per worker, data-parallel.

Each worker runs ``workers.train.train_loop`` with a ``RaySession``: ``prepare_model`` (DDP over gloo on
CPU, NCCL on GPU), a ``DistributedSampler`` share of each epoch, and per epoch one ``ray.train.report``
whose rank-0 checkpoint Ray Train copies to ``<storage_path>/<run_name>/``. A worker that dies makes the
controller restart the worker group (``FailureConfig.max_failures``), and every worker resumes from the
last checkpoint; ``--resume`` reuses the latest run's name, which makes Ray Train restore it the same way.

The fixed cost is what dominates a small job: see ``FAST_START_ENV`` and docs/benchmarks.md (Training).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from convray.workers.cluster import started_here
from convray.workers.models import CNN, build_model
from convray.workers.progress import EpochProgress
from convray.workers.train import TrainingData, epoch_line, load_spec, train_loop
from convray.workers.train_config import RUN_FIELDS, TrainConfig, TrainingFailed, changed_run_settings

STATE_FILE = "state.pt"
PUBLISHED_FILE = "published.json"  # in a run's directory once its model was published: {"model", "version"}
CHECKPOINT_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # the controller's list of registered checkpoints

# Ray Train V2 knobs (python/ray/train/v2/_internal/constants.py), set for this process unless the
# user set them; the driver hands them on to the controller and the workers.
FAST_START_ENV = {
    # The controller polls the worker group this often (default 2 s): each poll is a possible 2 s wait
    # after the workers start, after every restart, and after the last report before fit() returns.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # An extra actor that polls Ray Core's drain state every 5 s: nothing drains a laptop or a RayJob.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Per-run Prometheus metrics of the controller and workers, which convray does not scrape.
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # Train's JSON log files and its print() patch, which sends every print through a logger (so each
    # epoch line reached the driver twice) and logs each report and checkpoint at INFO.
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def choose_run_name(config: TrainConfig, model_name: str) -> str:
    """The run to train: a new UTC-stamped name, or with ``--resume`` the run to continue.

    That is the run ``--run-name`` names, else the latest run of ``model_name`` under the storage path.

    Raises:
        ValueError: ``--resume`` with no such run that saved a checkpoint.
    """
    if config.resume:
        root = Path(config.storage_path)
        if config.run_name:  # resume that one, whatever it is called
            if latest_checkpoint(root / config.run_name) is None:
                raise ValueError(f"--resume: run {config.run_name!r} has no checkpoint under {root.resolve()}")
            return config.run_name
        # Only this model's runs: "digits" must not pick up "digits-v2-<stamp>" (names may contain "-").
        own = re.compile(rf"{re.escape(model_name)}-\d{{8}}-\d{{6}}-\d{{6}}")
        checkpoints = [latest_checkpoint(p) for p in root.glob(f"{model_name}-*") if own.fullmatch(p.name)]
        newest = sorted((c for c in checkpoints if c is not None), key=lambda c: c.stat().st_mtime)
        if not newest:
            raise ValueError(f"--resume: no checkpointed run of {model_name!r} under {root.resolve()}")
        return newest[-1].parent.name
    return f"{model_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest ``checkpoint_*`` directory, None if it has none."""
    found = checkpoints_of(run_dir)
    return found[-1] if found else None


def checkpoints_of(run_dir: Path) -> list[Path]:
    """The run's ``checkpoint_*`` directories, oldest first."""
    # checkpoint_0004 and the like; not Ray's checkpoint_manager_snapshot.json beside them
    found = (p for p in run_dir.glob("checkpoint_*") if p.is_dir() and re.fullmatch(r"checkpoint_\d+", p.name))
    return sorted(found, key=lambda p: p.stat().st_mtime)


def saved_run_settings(config: TrainConfig) -> dict[str, Any] | None:
    """The settings run ``config.run_name`` was started with (``RUN_FIELDS``, and its spec as trained).

    Every checkpoint of a run holds the same settings, so the newest that can be read gives them: a last one
    half written when the run was stopped does not hide them (Ray Train restores the one before it then).
    None if the run has no checkpoint yet; empty for checkpoints written before runs kept their settings.

    Raises:
        ValueError: none of its checkpoints can be read.
    """
    assert config.run_name is not None
    checkpoints = checkpoints_of(run_path(config))
    if not checkpoints:
        return None
    problems = []
    for checkpoint in reversed(checkpoints):
        try:
            state = torch.load(checkpoint / STATE_FILE, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            problems.append(f"{checkpoint} has no {STATE_FILE}")
        except Exception as exc:  # noqa: BLE001 (torch raises several types for a damaged file)
            problems.append(f"cannot read the checkpoint {checkpoint}: {type(exc).__name__}: {exc}")
        else:
            return dict(state.get("run", {}))
    raise ValueError("; ".join(problems))


def continue_run(config: TrainConfig, model_name: str, given: set[str]) -> TrainConfig:
    """``--resume``: ``config`` with the run it continues, and that run's own settings where no flag was ``given``.

    So a plain ``--resume`` carries on as the run was started, whatever flags it was started with.

    Raises:
        ValueError: no run to resume, or its checkpoint cannot be read.
    """
    run_name = choose_run_name(config, model_name)
    saved = saved_run_settings(replace(config, run_name=run_name)) or {}
    kept = {field: value for field, value in saved.items() if field in RUN_FIELDS and field not in given}
    return replace(config, run_name=run_name, **kept)


def check_continues_as_started(config: TrainConfig) -> None:
    """Refuse to go on with run ``config.run_name`` under settings that shape it other than its own.

    It would not be that run continued (see ``RUN_FIELDS``); this holds for ``--resume`` and for ``--run-name``
    naming a run that has checkpoints, which Ray Train restores by name.

    Raises:
        ValueError: naming each setting that differs, or the checkpoint cannot be read.
    """
    saved = saved_run_settings(config) or {}
    changed = changed_run_settings(saved, config)
    if config.spec_file and "spec" in saved and load_spec(config).model_dump(mode="json") != saved["spec"]:
        changed.append(f"the spec in {config.spec_file} (edited since the run started)")
    if changed:
        raise ValueError(
            f"run {config.run_name} has checkpoints and goes on as it was started, but these settings differ from "
            f"its own ({'; '.join(changed)}); leave them out or give the run's values, or train a new run"
        )


def checkpoint_name(epoch: int) -> str:
    """The directory, in a run's, of the checkpoint saved after ``epoch`` (1-based)."""
    return f"checkpoint_{epoch:04d}"


def run_path(config: TrainConfig) -> Path:
    """Where run ``config.run_name`` keeps its checkpoints (Ray Train's) and convray's notes about it."""
    return Path(config.storage_path) / str(config.run_name)


def check_not_published(config: TrainConfig) -> None:
    """Refuse to go on with a run whose model was already published: it has nothing left to train.

    Ray Train restores a finished run by name and returns at once, so ``--resume`` (or ``--run-name``) would
    publish the same weights again as a new version.

    Raises:
        ValueError: naming the version it was published as.
    """
    marker = run_path(config) / PUBLISHED_FILE
    if marker.exists():
        try:
            published = json.loads(marker.read_text(encoding="utf-8"))
            version = f"as {published['model']} version {published['version']}"
        except (ValueError, KeyError, TypeError):  # a damaged marker still marks a finished run
            version = f"(its {PUBLISHED_FILE} is unreadable)"
        raise ValueError(
            f"run {config.run_name} is finished and was published {version}; leave out --resume and --run-name "
            "to train a new run"
        )


def mark_published(config: TrainConfig, model_name: str, version: int) -> None:
    """Note in the run's directory that its model is published (``check_not_published`` reads it)."""
    if run_path(config).is_dir():
        (run_path(config) / PUBLISHED_FILE).write_text(
            json.dumps({"model": model_name, "version": version}), encoding="utf-8"
        )


class RaySession:
    """``train_loop`` on one Ray Train worker: its rank, device, DDP, the all-reduce and checkpoints."""

    def __init__(self, on_epoch: Callable[[EpochProgress], None] | None, run_dir: Path) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._on_epoch, self._run_dir = on_epoch, run_dir

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to this worker's device; wrap in DistributedDataParallel when there are several workers."""
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def restore(self) -> dict[str, Any] | None:
        """The state in the run's latest checkpoint (after a worker failure or ``--resume``), else None."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # Loaded on the CPU (load_state): a GPU run's optimiser state would not load on a worker without one, and
        # load_state_dict moves each tensor to its parameter's device anyway.
        state = load_state(checkpoint)
        if self.rank == 0:
            print(f"resumed from {checkpoint.path} after epoch {len(state['history'])}", flush=True)
        return state

    def all_reduce(self, totals: torch.Tensor) -> torch.Tensor:
        """Sum over the workers (on the device: NCCL reduces only CUDA tensors)."""
        if self.world_size == 1:
            return totals
        on_device = totals.to(self.device)
        torch.distributed.all_reduce(on_device)
        return on_device.cpu()

    def report(self, progress: EpochProgress, record: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        """Every worker reports (a barrier); rank 0 also logs the epoch and hands Ray Train a checkpoint."""
        import ray.train

        if self.rank != 0:
            ray.train.report(record)
            return
        print(epoch_line(record, progress.epochs), flush=True)
        if self._on_epoch is not None:
            self._on_epoch(progress)
        with tempfile.TemporaryDirectory(prefix="convray-checkpoint-") as directory:
            torch.save(state(), Path(directory) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(record, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(progress.epoch))

    def crash(self, epoch: int) -> None:
        """Exit this worker process once the controller has registered the previous epoch's checkpoint.

        Reports are handed over through a one-slot queue the controller polls, so dying straight after
        ``report`` could lose that checkpoint and make the test that uses this depend on timing.
        """
        snapshot = self._run_dir / CHECKPOINT_SNAPSHOT_FILE
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if snapshot.exists() and checkpoint_name(epoch - 1) in snapshot.read_text(encoding="utf-8"):
                break
            time.sleep(0.05)
        print(f"failure injected: rank {self.rank} exits at the start of epoch {epoch}", flush=True)
        os._exit(17)


def worker_loop(loop_config: dict[str, Any]) -> None:
    """The function each Ray Train worker runs."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report and checkpoint
    config = TrainConfig(**loop_config["config"])
    config.threads = max(1, int(config.cpus_per_worker))  # intra-op threads = the CPUs Ray reserved
    train_loop(config, loop_config["data"], RaySession(loop_config["on_epoch"], run_path(config).resolve()))


def lean_torch_trainer(embedded_ray: bool) -> type:
    """TorchTrainer without helper actors this job has no use for, each one more process to start.

    - ``DatasetsCallback`` starts a ``DatasetManager`` actor even when no Ray Dataset is passed (the data
      here travels with the function).
    - ``PlacementGroupCleanerCallback`` starts an actor that removes the run's placement group should the
      controller die without doing so; a placement group belongs to its job, so Ray removes it when the
      ``convray train`` driver exits anyway.
    - On an embedded Ray (no autoscaler can exist), the scaling policy's resource requests to Ray Data's
      ``_AutoscalingCoordinatorActor``: the controller creates that actor and blocks on it (up to 5 s)
      before it places the workers. On a cluster they stay: they let an autoscaler add nodes.

    On 2 cores these three processes cost several seconds of a run meant to take under 20 (see
    docs/benchmarks.md). The hooks are Ray Train V2's private ones (Ray 2.60:
    python/ray/train/v2/api/data_parallel_trainer.py, _internal/execution/scaling_policy/fixed.py).
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    class NoAutoscalerScalingPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context: Any) -> None:
            pass  # no resource request: nothing could act on it

        def _maybe_send_resource_request(self) -> None:
            pass

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            unused = (DatasetsCallback, PlacementGroupCleanerCallback)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            if embedded_ray:
                kwargs["scaling_policy"] = NoAutoscalerScalingPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return LeanTorchTrainer


def trainer(
    config: TrainConfig,
    data: TrainingData,
    on_epoch: Callable[[EpochProgress], None] | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """The TorchTrainer for a run: scaling, storage, checkpoints and failure handling from ``config``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    resources = {"CPU": config.cpus_per_worker} | ({"GPU": 1} if config.gpu else {})
    return lean_torch_trainer(embedded_ray=not config.ray_address)(
        worker_loop,
        # The data travels with the function (one object-store put), not as a Ray Dataset: it is in
        # memory already, and the loop indexes it per epoch without a data pipeline in between.
        train_loop_config={"config": asdict(config), "data": data, "on_epoch": on_epoch},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if config.gpu else "gloo", timeout_s=300),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=str(Path(config.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def refuse_what_cannot_fit(config: TrainConfig) -> None:
    """On an embedded Ray, which no node can join, refuse workers that ask for more than it has in all.

    Nothing to check when the run joins a cluster: its autoscaler may add nodes.

    Ray Train would otherwise wait for them for ever, retrying without end.

    Raises:
        ValueError: naming the resource, the ask and what this Ray has.
    """
    from convray.workers.cluster import shortfall

    if not started_here(config.ray_address):
        return
    each = {"CPU": config.cpus_per_worker, "GPU": float(config.gpu)}
    if (short := shortfall(config.workers, each)) is not None:
        resource, asked, has = short
        flag = "--cpus-per-worker" if resource == "CPU" else "--gpu"
        raise ValueError(
            f"{config.workers} Ray Train worker(s) ask for {asked:g} {resource} in all ({each[resource]:g} each) "
            f"and this local Ray has {has:g}, and no node can join it: lower --workers or {flag}"
            + (", or run on a machine with a GPU" if resource == "GPU" else "")
        )


def load_state(checkpoint: Any) -> dict[str, Any]:
    """The training state saved in a Ray Train checkpoint."""
    with checkpoint.as_directory() as directory:
        # On the driver, which may have no GPU when the workers had one.
        state: dict[str, Any] = torch.load(Path(directory) / STATE_FILE, weights_only=True, map_location="cpu")
    return state


def first_cause(failure: Exception) -> str:
    """One line saying why a Ray Train run failed: the last line of the lowest rank's error.

    Ray's own message holds every worker's whole traceback; the lowest rank's error is the cause, where the
    others' are often its side effects (found in review: rank 1's "Connection closed by peer" in gloo, after
    rank 0 died).
    """
    failures = getattr(failure, "worker_failures", None) or {}
    error = failures[min(failures)] if failures else failure
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__


def fit(
    config: TrainConfig,
    data: TrainingData,
    log: Callable[[str], Any] = print,
    on_epoch: Callable[[EpochProgress], None] | None = None,
) -> tuple[CNN, list[dict[str, Any]]]:
    """Run ``train_loop`` on ``config.workers`` Ray Train workers; return the trained model and its curve.

    Raises:
        TrainingFailed: the workers failed more than ``config.max_failures`` times (the message says whether a
            checkpoint is kept, and how to continue from it).
    """
    from ray.train import TrainingFailedError

    for name, value in FAST_START_ENV.items():
        os.environ.setdefault(name, value)
    refuse_what_cannot_fit(config)
    started = time.monotonic()
    config = replace(config, run_name=config.run_name or choose_run_name(config, "run"))
    try:
        result = trainer(config, data, on_epoch).fit()
    except TrainingFailedError as exc:
        run_dir = run_path(config).resolve()
        kept = (
            f"Its last checkpoint is kept under {run_dir}: continue it with --resume --run-name {config.run_name}"
            if any(run_dir.glob("checkpoint_*"))
            else "It saved no checkpoint"
        )
        raise TrainingFailed(
            f"run {config.run_name} failed (restarts allowed: {config.max_failures}, --max-failures): "
            f"{first_cause(exc)}. {kept}"
        ) from exc
    state = load_state(result.checkpoint)
    _, _, height, width = data.train.images.shape
    model = build_model(data.spec, height, width)
    model.load_state_dict(state["model"])
    log(
        f"Ray Train: {config.workers} worker(s), run {config.run_name} in {time.monotonic() - started:.1f} s, "
        f"checkpoint {result.checkpoint.path}"
    )
    return model, state["history"]
