"""The model repository: the shipped default model, publishing, and clear errors for broken versions."""

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convray.workers.repository import (
    METADATA_FILE,
    WEIGHTS_FILE,
    ModelLoadError,
    ModelRepository,
    UnservableWeights,
    validate_model_name,
)
from tests.conftest import SHIPPED_MODELS


def test_shipped_digits_model_loads_and_meets_its_accuracy_floor():
    repo = ModelRepository(SHIPPED_MODELS)
    assert "digits" in repo.model_names()
    loaded = repo.load("digits")
    assert loaded.version == repo.latest_version("digits")
    assert loaded.metadata.metrics["accuracy"] >= 0.97
    assert loaded.metadata.labels == [str(d) for d in range(10)]
    assert not loaded.module.training
    size = sum(p.stat().st_size for p in repo.version_dir("digits", loaded.version).iterdir())
    assert size < 2 * 1024 * 1024


def test_highest_version_is_the_default_and_odd_entries_are_ignored(model_repo):
    repo = ModelRepository(model_repo)
    shutil.copytree(model_repo / "digits" / "1", model_repo / "digits" / "7")
    for odd in ("0", "01", "-3", "latest", ".publish-tmp"):
        (model_repo / "digits" / odd).mkdir()
    assert repo.versions("digits") == [1, 7]
    assert repo.load("digits").version == 7


def test_publish_writes_the_next_version_atomically_and_it_loads_back(model_repo):
    repo = ModelRepository(model_repo)
    original = repo.load("digits", 1)
    version = repo.publish("digits", original.metadata, original.module)
    assert version == 2
    assert not [p for p in (model_repo / "digits").iterdir() if p.name.startswith(".")]
    again = repo.load("digits", 2)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(again.module(x), original.module(x))


def test_publish_flushes_every_file_and_the_version_to_disk_before_and_after_it_appears(model_repo, monkeypatch):
    """A poller must never find, after a crash or power loss, a version whose files were not yet written out."""
    import os

    repo = ModelRepository(model_repo)
    original = repo.load("digits", 1)
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def rename(source, target) -> None:
        events.append(("rename", str(target)))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    repo.publish("digits", original.metadata, original.module, extra_files={"curve.png": b"png"})
    rename_at = events.index(("rename", str(model_repo / "digits" / "2")))
    flushed_before = {Path(path).name for kind, path in events[:rename_at] if kind == "fsync"}
    assert {METADATA_FILE, WEIGHTS_FILE, "curve.png"} <= flushed_before
    assert any(name.startswith(".publish-") for name in flushed_before)  # the staging directory's entries
    assert events[rename_at + 1 :] == [("fsync", str(model_repo / "digits"))]  # the rename itself


def test_publish_works_where_the_filesystem_refuses_to_fsync_a_directory(model_repo, monkeypatch):
    """CIFS/SMB before Linux 4.17 and some FUSE mounts answer EINVAL: the files are still flushed, the version made."""
    import errno
    import os

    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{descriptor}")).is_dir():
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    repo = ModelRepository(model_repo)
    original = repo.load("digits", 1)
    assert repo.publish("digits", original.metadata, original.module) == 2


def test_a_failed_flush_after_the_rename_is_reported_as_itself(model_repo, monkeypatch):
    """Not as a taken version number, which sent publish on to rename a staging directory that was gone."""
    import errno
    import os

    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if os.readlink(f"/proc/self/fd/{descriptor}") == str(model_repo / "digits"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    repo = ModelRepository(model_repo)
    original = repo.load("digits", 1)
    with pytest.raises(OSError) as failed:
        repo.publish("digits", original.metadata, original.module)
    assert failed.value.errno == errno.EIO


def test_publish_steps_over_a_plain_file_where_the_next_version_would_go(model_repo):
    """Before, it tried the same number forever: the file is not a version, so the highest stayed 1."""
    repo = ModelRepository(model_repo)
    original = repo.load("digits", 1)
    (model_repo / "digits" / "2").write_text("not a version")
    published: list[int] = []

    def publish() -> None:
        published.append(repo.publish("digits", original.metadata, original.module))

    publishing = threading.Thread(target=publish, daemon=True)  # a thread: the old code never returned
    publishing.start()
    publishing.join(timeout=30)
    assert published == [3] and repo.versions("digits") == [1, 3]


@pytest.mark.parametrize("name", ["../models/digits", "/abs/digits", "digits/.."])
def test_a_path_is_no_model_of_the_repository(model_repo, name):
    assert (model_repo / "../models/digits").is_dir()  # the path leads to a model's directory, as a path
    repo = ModelRepository(model_repo)
    assert repo.versions(name) == [] and repo.latest_version(name) is None


def test_publish_refuses_a_bad_model_name(model_repo):
    with pytest.raises(ValueError, match="invalid model name"):
        validate_model_name("../escape")


def break_json(model_repo, edit):
    path = model_repo / "digits" / "1" / METADATA_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["spec"]["blocks"][0].update(filters=-1), r"spec\.blocks\.0\.conv\.filters"),
        (lambda d: d.pop("labels"), r"labels: Field required"),
        (lambda d: d["labels"].pop(), "labels has 9 names but spec.num_classes is 10"),
        (lambda d: d["input"].update(colour_mode="CMYK"), r"input\.colour_mode"),
        (lambda d: d["input"]["normalisation"].update(std=[0.0]), "every std must be > 0"),
        (lambda d: d["input"]["normalisation"].update(mean=[float("nan")]), "mean and std must be finite numbers"),
        (lambda d: d["metrics"].pop("accuracy"), "metrics.accuracy must be a number"),
        (lambda d: d.update(surprise=1), "surprise: Extra inputs are not permitted"),
    ],
)
def test_invalid_model_json_names_the_file_and_field(model_repo, edit, message):
    path = break_json(model_repo, edit)
    with pytest.raises(ModelLoadError, match=message) as info:
        ModelRepository(model_repo).load("digits", 1)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "[" * 100_000 + "]" * 100_000])
def test_a_model_json_that_does_not_parse_is_a_load_error_naming_the_file(model_repo, text):
    """Nested too deep, Python's parser raises RecursionError: it escaped as such and ended the model poller."""
    path = model_repo / "digits" / "1" / METADATA_FILE
    path.write_text(text)
    with pytest.raises(ModelLoadError, match="not readable JSON") as info:
        ModelRepository(model_repo).read_metadata("digits", 1)
    assert str(path) in str(info.value)


def test_missing_files_are_named(model_repo):
    (model_repo / "digits" / "1" / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelLoadError, match=f"{WEIGHTS_FILE}: file not found"):
        ModelRepository(model_repo).load("digits", 1)
    (model_repo / "digits" / "1" / METADATA_FILE).unlink()
    with pytest.raises(ModelLoadError, match=f"{METADATA_FILE}: file not found"):
        ModelRepository(model_repo).load("digits", 1)


def test_corrupt_weights_are_reported(model_repo):
    path = model_repo / "digits" / "1" / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        ModelRepository(model_repo).load("digits", 1)


def test_weights_that_do_not_fit_the_spec_are_listed(model_repo):
    break_json(model_repo, lambda d: d["spec"]["blocks"][0].update(filters=16))
    with pytest.raises(ModelLoadError, match=r"weights do not match model.json's spec: .*expected \(16, 1, 3, 3\)"):
        ModelRepository(model_repo).load("digits", 1)


def rewrite_weights(model_repo, change) -> None:
    path = model_repo / "digits" / "1" / WEIGHTS_FILE
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def test_weights_of_another_kind_are_refused_not_cast(model_repo):
    """Found in review: int8 weights loaded (load_state_dict casts) and served 0.1 for every class."""
    rewrite_weights(model_repo, lambda state: state.update({k: v.to(torch.int8) for k, v in state.items()}))
    with pytest.raises(ModelLoadError, match=r"features.0.1.weight is torch.int8, expected a floating-point type"):
        ModelRepository(model_repo).load("digits", 1)


def test_weights_holding_nan_or_infinity_are_refused(model_repo):
    """Found in review: served as NaN probabilities for every image."""
    rewrite_weights(model_repo, lambda state: state["features.0.1.weight"].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(ModelLoadError, match=r"tensors with NaN or infinite values: \['features.0.1.weight'\]"):
        ModelRepository(model_repo).load("digits", 1)


def test_weights_holding_nan_or_infinity_are_not_published(model_repo):
    """Found in review: a diverged run published a version every server refused to load and retried for ever."""
    repo = ModelRepository(model_repo)
    loaded = repo.load("digits", 1)
    with torch.no_grad():
        loaded.module.state_dict()["features.0.1.weight"].view(-1)[0] = float("inf")
    with pytest.raises(UnservableWeights, match=r"^digits: not published: tensors with NaN or infinite values \["):
        repo.publish("digits", loaded.metadata, loaded.module)
    assert repo.versions("digits") == [1] and sorted(p.name for p in (model_repo / "digits").iterdir()) == ["1"]


def test_weights_are_refused_under_a_spec_edited_since_they_were_published(model_repo):
    """Found in review: max pooling edited to min in model.json kept every tensor's shape, loaded silently and
    moved the shipped model's answer for a 3 from 0.935 to class 1. Weights now carry their spec's digest."""
    repo = ModelRepository(model_repo)
    original = repo.load("digits", 1)
    assert repo.publish("digits", original.metadata, original.module) == 2
    repo.load("digits", 2)  # unchanged: loads
    for version in (1, 2):
        path = model_repo / "digits" / str(version) / METADATA_FILE
        data = json.loads(path.read_text())
        next(block for block in data["spec"]["blocks"] if block["type"] == "pool")["kind"] = "min"
        path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="published with a different spec than model.json's now"):
        repo.load("digits", 2)
    repo.load("digits", 1)  # published before weights carried a digest: cannot be checked, loads as before


def test_a_model_without_versions_is_an_error(model_repo):
    (model_repo / "empty").mkdir()
    repo = ModelRepository(model_repo)
    assert "empty" not in repo.model_names()
    with pytest.raises(ModelLoadError, match="has no versions"):
        repo.load("empty")
