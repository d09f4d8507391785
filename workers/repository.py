"""The model repository on disk: ``<repo>/<model-name>/<version>/{model.json, model.safetensors}``.

Versions are positive integers; the highest is served by default. ``model.json`` holds the CNN
spec, the labels, the input contract and the held-out metrics; the weights are a safetensors file.
Everything is validated on load and errors name the file and the field. New versions are written
to a hidden temporary directory and renamed into place, so a reader never sees half a version.

torch is imported only where modules are built, loaded or written: the front end reads model.json and never
loads it (about 180 MiB and 2 s a process; ``tests/e2e/test_cli.py`` checks).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError, safe_open

from convray.workers.spec import CNNSpec

if TYPE_CHECKING:
    import torch

    from convray.workers.models import CNN

METADATA_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
SPEC_DIGEST_KEY = "convray_spec_sha256"  # in the weights file's metadata: the spec they were published for
FORMAT_VERSION = 1
MAX_NAME_CHARS = 64
_NAME_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME_CHARS - 1}}}"
_VERSION_DIR = re.compile(r"[1-9][0-9]{0,17}")


class ModelLoadError(Exception):
    """A model version on disk is missing, malformed or inconsistent; the message says where."""


class UnservableWeights(ValueError):
    """Weights ``publish`` refuses because every server would refuse to load them (NaN or infinite values)."""


class Normalisation(BaseModel):
    """Per-channel normalisation applied to ``pixel / 255``: ``(x - mean) / std``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _positive_std(self) -> Normalisation:
        if not all(math.isfinite(v) for v in [*self.mean, *self.std]):
            raise ValueError(f"mean and std must be finite numbers, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"every std must be > 0, got {self.std}")
        return self


class InputContract(BaseModel):
    """What the model expects: the size and colour mode images are converted to, and normalisation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    channels: Literal[1, 3]
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    colour_mode: Literal["L", "RGB"]
    normalisation: Normalisation

    @model_validator(mode="after")
    def _consistent(self) -> InputContract:
        expected = 1 if self.colour_mode == "L" else 3
        if self.channels != expected:
            raise ValueError(f"colour_mode {self.colour_mode!r} has {expected} channel(s), not {self.channels}")
        for field in ("mean", "std"):
            values = getattr(self.normalisation, field)
            if len(values) != self.channels:
                raise ValueError(f"normalisation.{field} needs {self.channels} value(s), got {len(values)}")
        return self


class ModelMetadata(BaseModel):
    """The contents of ``model.json``: everything about a version except its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: Literal[1] = FORMAT_VERSION
    spec: CNNSpec
    labels: list[str] = Field(min_length=1)
    input: InputContract
    metrics: dict[str, Any]
    """Held-out metrics the version was trained to; ``accuracy`` (0..1) is required."""
    training: dict[str, Any] = {}
    """How the version was made: dataset, seed, epochs, command; free-form, for people."""

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        if len(self.labels) != self.spec.num_classes:
            raise ValueError(f"labels has {len(self.labels)} names but spec.num_classes is {self.spec.num_classes}")
        if self.spec.in_channels != self.input.channels:
            raise ValueError(
                f"spec.in_channels ({self.spec.in_channels}) differs from input.channels ({self.input.channels})"
            )
        accuracy = self.metrics.get("accuracy")
        if not isinstance(accuracy, (int, float)) or not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"metrics.accuracy must be a number in [0, 1], got {accuracy!r}")
        return self


@dataclass(frozen=True)
class LoadedModel:
    """A model version read from disk: its identity, metadata and the built module with weights."""

    name: str
    version: int
    metadata: ModelMetadata
    module: CNN


def is_model_name(name: str) -> bool:
    """Whether ``name`` can name a model: letters, digits, ``_.-``, at most 64 (no path, so never outside)."""
    return re.fullmatch(_NAME_PATTERN, name) is not None


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (letters, digits, ``_.-``, at most 64), else raise."""
    if not is_model_name(name):
        shown = repr(name) if len(name) <= 80 else f"{name[:80]!r}... ({len(name)} characters)"
        raise ValueError(f"invalid model name {shown}: use letters, digits, '_', '.', '-' (at most 64)")
    return name


def format_validation_error(path: Path, error: ValidationError) -> str:
    """One line naming ``path`` and each field pydantic refused, without its links (for model.json, --spec)."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        problems.append(f"{where}: {item['msg']}")
    return f"{path}: " + "; ".join(problems)


class ModelRepository:
    """A model repository rooted at a directory; lists, loads and publishes model versions."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def model_names(self) -> list[str]:
        """Names of the models that have at least one version directory, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        """The version numbers of ``name`` on disk, ascending; hidden and non-numeric entries are ignored."""
        if not is_model_name(name):  # "../x" or "/x" would be a directory outside the repository
            return []
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION_DIR.fullmatch(p.name))

    def latest_version(self, name: str) -> int | None:
        """The highest version of ``name``, or None when it has none."""
        versions = self.versions(name)
        return versions[-1] if versions else None

    def version_dir(self, name: str, version: int) -> Path:
        """The directory that holds one version."""
        return self.root / name / str(version)

    def read_metadata(self, name: str, version: int) -> ModelMetadata:
        """Read and validate one version's ``model.json``.

        Raises:
            ModelLoadError: the file is missing, not JSON, or a field is wrong (named in the message).
        """
        path = self.version_dir(name, version) / METADATA_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # nested too deep
            raise ModelLoadError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from None
        try:
            return ModelMetadata.model_validate(raw)
        except ValidationError as exc:
            raise ModelLoadError(format_validation_error(path, exc)) from None

    def load(self, name: str, version: int | None = None) -> LoadedModel:
        """Load a version (the latest when None): metadata, module and weights, in eval mode, on CPU.

        Raises:
            ModelLoadError: anything missing or inconsistent, with the file and field named.
        """
        if version is None:
            version = self.latest_version(name)
            if version is None:
                raise ModelLoadError(f"{self.root / name}: model {name!r} has no versions")
        from convray.workers.models import build_model

        metadata = self.read_metadata(name, version)
        try:
            module = build_model(metadata.spec, metadata.input.height, metadata.input.width)
        except ValueError as exc:
            raise ModelLoadError(f"{self.version_dir(name, version) / METADATA_FILE}: spec: {exc}") from None
        weights_path = self.version_dir(name, version) / WEIGHTS_FILE
        load_weights(module, weights_path, spec_digest(metadata.spec))
        module.eval()
        return LoadedModel(name=name, version=version, metadata=metadata, module=module)

    def check_publishable(self, name: str) -> None:
        """Raise now if ``publish(name, ...)`` could not write here, rather than after a whole training run.

        Raises:
            ValueError: the repository or the model's directory cannot be made or written to, and why.
        """
        validate_model_name(name)
        target = self.root / name
        missing = [p for p in [target, *target.parents] if not p.exists()]  # deepest first; made for the check only
        try:
            target.mkdir(parents=True, exist_ok=True)
            os.rmdir(tempfile.mkdtemp(prefix=".publish-check-", dir=target))
        except OSError as exc:
            raise ValueError(
                f"model repository {self.root}: cannot publish {name!r} there: {exc.strerror or exc} "
                f"({exc.filename or target})"
            ) from None
        finally:
            for made in missing:
                with contextlib.suppress(OSError):
                    made.rmdir()

    def publish(
        self, name: str, metadata: ModelMetadata, module: torch.nn.Module, extra_files: dict[str, bytes] | None = None
    ) -> int:
        """Write a new version (one above the highest) atomically and return its number.

        ``extra_files`` (name -> bytes) land beside the weights, e.g. the training plots.
        """
        from safetensors.torch import save_file

        validate_model_name(name)
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        not_finite = non_finite_tensors(state)
        if not_finite:  # found in review: a diverged run published a version its servers retried loading for ever
            raise UnservableWeights(
                f"{name}: not published: tensors with NaN or infinite values {not_finite[:5]} (the training "
                "diverged: a lower learning rate usually mends it); a server would refuse to load them"
            )
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=model_dir))
        try:
            (staging / METADATA_FILE).write_text(metadata.model_dump_json(indent=2) + "\n", encoding="utf-8")
            save_file(
                state,
                str(staging / WEIGHTS_FILE),
                metadata={"format": "pt", SPEC_DIGEST_KEY: spec_digest(as_written(metadata.spec))},
            )
            for extra, content in (extra_files or {}).items():
                if extra in (METADATA_FILE, WEIGHTS_FILE) or Path(extra).name != extra:
                    raise ValueError(f"extra file name {extra!r} must be a plain name other than the model's own")
                (staging / extra).write_bytes(content)
            for path in staging.iterdir():
                os.chmod(path, 0o644)  # readable by serving pods that run as another user
            os.chmod(staging, 0o755)
            # On disk before the rename makes the version visible: after a crash or power loss a poller must not
            # find a version directory whose files are empty or half written.
            for path in [*staging.iterdir(), staging]:
                _fsync(path)
            version = 0
            while True:  # another publisher may take a number first: move on to the next one
                version = max(version, self.latest_version(name) or 0) + 1
                try:
                    os.rename(staging, self.version_dir(name, version))
                except OSError:
                    if not self.version_dir(name, version).exists():
                        raise
                    # Taken: by another publisher's version, or by something that is not a version (a plain
                    # file, which latest_version skips): either way the next number, never this one again.
                    continue
                _fsync(model_dir)  # the rename itself
                return version
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file's, or a directory's entries', writes to the disk.

    Some shared filesystems refuse fsync on a directory (CIFS/SMB before Linux 4.17, some FUSE mounts): that is
    skipped there, as every program that publishes this way has to.
    """
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as exc:
        if not (path.is_dir() and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)):
            raise
    finally:
        os.close(descriptor)


def spec_digest(spec: CNNSpec) -> str:
    """SHA-256 of the spec as model.json holds it: the fields set, keys sorted. What the weights were trained for.

    Fields not set are left out, so a field added to the schema later (with a default) does not change the
    digest of a spec published before it; ``publish`` sets every field (``as_written``).
    """
    canonical = json.dumps(spec.model_dump(mode="json", exclude_unset=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def as_written(spec: CNNSpec) -> CNNSpec:
    """``spec`` with every field set, as ``publish`` writes it (defaults included) and a load then reads it."""
    return CNNSpec.model_validate(spec.model_dump(mode="json"))


def load_weights(module: torch.nn.Module, path: Path, digest: str | None = None) -> None:
    """Load a safetensors file into ``module``, requiring exactly its parameter names and shapes.

    ``digest``: the ``spec_digest`` of the spec ``module`` was built from. Weights published with another
    spec's digest are refused: an edit to model.json that keeps every tensor's shape (max pooling made min,
    an activation changed) would otherwise serve the old weights through a different network. Files
    published before the digest was kept have none and are not checked.

    Raises:
        ModelLoadError: the file is missing or corrupt, or names/shapes differ (listed in the message).
    """
    try:
        with safe_open(str(path), framework="pt") as weights:  # one read for the metadata and the tensors
            published_for = (weights.metadata() or {}).get(SPEC_DIGEST_KEY)
            state = {name: weights.get_tensor(name) for name in weights.keys()}
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    both = sorted(set(state) & set(expected))
    wrong_shape = [
        f"{key} is {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
        for key in both
        if state[key].shape != expected[key].shape
    ]
    # load_state_dict casts: int8 weights would be truncated and served, integer counters made fractional.
    kind = {True: "floating-point", False: "integer"}
    wrong_kind = [
        f"{key} is {state[key].dtype}, expected a {kind[expected[key].is_floating_point()]} type"
        for key in both
        if state[key].is_floating_point() != expected[key].is_floating_point()
    ]
    if missing or unexpected or wrong_shape or wrong_kind:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        parts += wrong_shape + wrong_kind
        raise ModelLoadError(f"{path}: weights do not match model.json's spec: " + "; ".join(parts))
    if digest is not None and published_for is not None and published_for != digest:
        raise ModelLoadError(
            f"{path}: these weights were published with a different spec than model.json's now (edited since?); "
            "publish the model again rather than edit its spec"
        )
    # A NaN or infinity would be served as a NaN probability for every image (and a JSON reply that is not JSON).
    not_finite = non_finite_tensors(state)
    if not_finite:
        raise ModelLoadError(f"{path}: tensors with NaN or infinite values: {not_finite}")
    module.load_state_dict(state)


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of ``state``'s floating-point tensors holding a NaN or an infinity."""
    import torch

    return [key for key, value in state.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
