"""Fixtures for checking deploy/ offline: the dev tools (installed by `make install`) and the built overlays."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "k8s"
# Every kustomization an operator applies: the two serving flavours and the training job.
BUILDS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu", "train": K8S / "train"}


def tool(name: str) -> str:
    """The path of a dev tool, preferring the one in this virtual environment (the dev extra installs it).

    Skips the test when the tool is missing, except in CI (CI=true), where that is a failure.
    """
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if found:
        return found
    message = f"{name} not found: `make install` installs it (pyproject.toml, dev extra)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def kustomize_build(path: Path) -> list[dict]:
    """`kubectl kustomize PATH` parsed into objects; fails the test with kustomize's message."""
    result = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize build of {path} failed:\n{result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@pytest.fixture(scope="session")
def built() -> dict[str, list[dict]]:
    """Every kustomization in BUILDS, built once per test run."""
    return {name: kustomize_build(path) for name, path in BUILDS.items()}


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of a kind (and name prefix, as generated ConfigMaps get a hash suffix)."""
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"].startswith(name))]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in matches]}"
    return matches[0]
