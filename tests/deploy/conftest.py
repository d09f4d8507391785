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
# The opt-in components (deploy/k8s/components) on top of the builds they are meant for, as an operator adds them.
WITH_COMPONENTS = {f"{build}+ray-token-auth": (build, "ray-token-auth") for build in BUILDS}
ALL_BUILDS = [*BUILDS, *WITH_COMPONENTS]


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


def with_component(build: str, component: str, folder: Path) -> Path:
    """A kustomization in ``folder`` that adds ``component`` to ``build``, referring to both by relative paths."""
    base = os.path.relpath(BUILDS[build], folder)
    added = os.path.relpath(K8S / "components" / component, folder)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [base], "components": [added]}  # fmt: skip
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return folder


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Every kustomization in BUILDS, and each in WITH_COMPONENTS, built once per test run."""
    builds = {name: kustomize_build(path) for name, path in BUILDS.items()}
    for name, (build, component) in WITH_COMPONENTS.items():
        builds[name] = kustomize_build(with_component(build, component, tmp_path_factory.mktemp("kustomization")))
    return builds


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of a kind (and name prefix, as generated ConfigMaps get a hash suffix)."""
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"].startswith(name))]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in matches]}"
    return matches[0]
