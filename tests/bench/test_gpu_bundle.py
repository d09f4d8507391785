"""scripts/gpu_bundle.py and scripts/gpu_lease.sh: a GPU lease gets everything convray needs and runs every GPU test.

The lease itself cannot run here (no GPU, and the bundle is fetched from the package index); these keep the two
scripts in step with the project as it changes.
"""

from __future__ import annotations

import importlib.util
import re
import zipfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("gpu_bundle", REPO_ROOT / "scripts" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_bundle)


def test_every_runtime_dependency_is_carried_or_already_on_the_device():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    for line in pyproject["project"]["dependencies"]:
        name = gpu_bundle.canonical(Requirement(line).name)
        if name == "torch":  # the device's own CUDA build
            continue
        assert name in gpu_bundle.WANTED or name in gpu_bundle.DEVICE_HAS, f"{name}: add it to WANTED in gpu_bundle.py"


def test_the_lease_runs_every_test_file_that_needs_a_gpu():
    lease = (REPO_ROOT / "scripts" / "gpu_lease.sh").read_text()
    needing_a_gpu = {
        path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "tests").rglob("test_*.py")
        if path != Path(__file__) and 'reason="needs a GPU"' in path.read_text()
    }
    assert needing_a_gpu, "no GPU tests found: the marker's wording changed"
    run_by_lease = set(re.findall(r"tests/\S+\.py", lease.split("tests)", 1)[1].split(";;", 1)[0]))
    assert needing_a_gpu <= run_by_lease


def wheel(folder: Path, name: str, requires: list[str]) -> Path:
    """A minimal wheel file whose METADATA names these requirements."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        lines = [f"Name: {name}", "Version: 1.0", *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{name}-1.0.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def test_requirements_follow_the_device_python_and_the_extras_asked_for(tmp_path):
    path = wheel(
        tmp_path,
        "demo",
        ["always", "old; python_version < '3.11'", "for-serve; extra == 'serve'", "for-tune; extra == 'tune'"],
    )
    names = {r.name for r in gpu_bundle.requirements_of(path, ("serve",), "3.12")}
    assert names == {"always", "for-serve"}


def test_a_needed_package_neither_carried_nor_on_the_device_stops_the_bundle(tmp_path):
    wheel(tmp_path, "demo", ["numpy", "not-on-the-device"])
    try:
        gpu_bundle.keep_only_missing(tmp_path, "3.12")
    except SystemExit as stop:
        assert "not-on-the-device (for demo)" in str(stop)
    else:
        raise AssertionError("the bundle was let through without not-on-the-device")


def test_packages_the_device_has_are_left_behind_except_those_the_stubs_need_new(tmp_path):
    for name in ("numpy", "grpcio", "pydantic"):
        wheel(tmp_path, name, [])
    gpu_bundle.keep_only_missing(tmp_path, "3.12")
    assert {p.name.split("-")[0] for p in tmp_path.glob("*.whl")} == {"grpcio", "pydantic"}


def test_ray_is_repacked_without_what_a_device_call_cannot_carry(tmp_path):
    path = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ray/__init__.py", "")
        archive.writestr("ray/jars/ray_dist.jar", b"x" * 100)
        archive.writestr("ray/rllib/__init__.py", "")
        archive.writestr("ray-2.60.0.dist-info/RECORD", "ray/__init__.py,,\nray/jars/ray_dist.jar,,\n")
    gpu_bundle.strip_ray(tmp_path)
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["ray/__init__.py", "ray-2.60.0.dist-info/RECORD"]
        assert archive.read("ray-2.60.0.dist-info/RECORD") == b"ray/__init__.py,,\n"
