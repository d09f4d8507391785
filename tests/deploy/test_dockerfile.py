"""deploy/docker/Dockerfile: lint-clean, and what it runs is what the project runs (no engine here to build it)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from convray.service.config import Settings
from tests.conftest import REPO_ROOT
from tests.deploy.conftest import DOCKERFILE, tool

pytestmark = pytest.mark.deploy


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1] if " " in row else "") for row in rows]


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"ARG {name} not in {DOCKERFILE}"
    return match.group(1)


def healthcheck_argv() -> list[str]:
    (args,) = [a for i, a in instructions() if i == "HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + 3 :].strip())


def test_hadolint_passes():
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_builds_the_stubs_of_every_proto_with_the_make_proto_command():
    """Every API's stubs: an image with the native ones only could not import the server (convray.oip)."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    make_flags = re.search(r"grpc_tools\.protoc (-I proto .*?) \$\(PROTOS\)", makefile).group(1)
    protos = re.search(r"^PROTOS := \$\(wildcard (\S+)\)$", makefile, re.MULTILINE).group(1)
    runs = " ".join(a for i, a in instructions() if i == "RUN")
    assert f"python -m grpc_tools.protoc {make_flags} {protos}" in re.sub(r"\s+", " ", runs)
    packages = {path.parent.name for path in REPO_ROOT.glob(protos)}
    assert packages == {"v1", "oip"}  # the glob reaches both APIs


def test_the_wheel_the_image_installs_is_the_one_pyproject_builds():
    version = re.search(r'^version = "(.+)"$', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    wheels = set(re.findall(r"/wheels/(convray-\S+\.whl)", DOCKERFILE.read_text()))
    assert wheels == {f"convray-{version}-py3-none-any.whl"}


def test_the_container_listens_on_every_interface_exposes_its_ports_and_runs_as_non_root():
    """The default gRPC and metrics ports, and the REST port that deploy/k8s turns on (off by default)."""
    env = " ".join(a for i, a in instructions() if i == "ENV")
    assert "CONVRAY_SERVER__HOST=0.0.0.0" in env and "CONVRAY_SERVER__METRICS_HOST=0.0.0.0" in env
    defaults = Settings().server
    k8s_env = (REPO_ROOT / "deploy" / "k8s" / "base" / "convray.env").read_text()
    (rest_port,) = re.findall(r"^CONVRAY_SERVER__HTTP_PORT=(\d+)$", k8s_env, re.MULTILINE)
    (exposed,) = [a.split() for i, a in instructions() if i == "EXPOSE"]
    assert defaults.http_port is None and exposed == [str(defaults.port), rest_port, str(defaults.metrics_port)]
    (user,) = [a for i, a in instructions() if i == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and uid != "0", "numeric, so Kubernetes' runAsNonRoot can check it"
    assert ("ENTRYPOINT", '["convray"]') in instructions()
    assert "COPY --chown=1000:1000 models /app/models" in [f"COPY {a}" for i, a in instructions() if i == "COPY"]


def test_a_login_shell_keeps_the_venv_on_path_as_kuberay_before_1_4_starts_ray():
    """Found in review: older KubeRay runs `bash -lc 'ray start ...'`; Debian's /etc/profile resets PATH, so the
    venv, set only by ENV, was lost and the Ray pods could not start."""
    (script,) = [a for i, a in instructions() if i == "RUN" and "/etc/profile.d/" in a]
    written = re.fullmatch(r"echo '(.*)' > (/etc/profile\.d/\S+\.sh)", script)
    assert written, script
    env = {"VIRTUAL_ENV": "/opt/venv", "PATH": "/usr/bin:/bin"}  # /etc/profile's PATH, as a login shell has it
    shell = subprocess.run(["bash", "-c", f"{written.group(1)}; echo $PATH"], env=env, capture_output=True, text=True)
    assert shell.stdout.strip().split(":")[0] == "/opt/venv/bin"
    env_lines = " ".join(a for i, a in instructions() if i == "ENV")
    assert "VIRTUAL_ENV=/opt/venv" in env_lines  # which the script reads, in the image and in the pods


def test_the_image_installs_the_versions_the_tests_ran_with_within_pyprojects_ranges():
    """Found in review: only torch and Ray were pinned, so two builds of one commit could differ."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later

    from packaging.requirements import Requirement

    constraints = (REPO_ROOT / "deploy" / "docker" / "constraints.txt").read_text().splitlines()
    pinned = dict(line.split("==", 1) for line in constraints if line and not line.startswith("#"))
    pinned = {name.lower().replace("_", "-"): version for name, version in pinned.items()}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["train"]]:
        requirement = Requirement(text)
        name = requirement.name.lower()
        if name == "torch":
            assert name not in pinned  # the Dockerfile pins it, and its CUDA build brings its own wheels
            continue
        assert name in pinned, f"{name} is not held by constraints.txt (run scripts/lock_image.py)"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (name, pinned[name])
    assert pinned["ray"] == dockerfile_arg("RAY_VERSION")
    installs = [a for i, a in instructions() if i == "RUN" and "convray-0.1.0-py3-none-any.whl" in a]
    assert len(installs) == 2  # cpu and cuda
    mount = "--mount=type=bind,source=deploy/docker/constraints.txt,target=/tmp/constraints.txt"
    assert all(mount in a and "-c /tmp/constraints.txt" in a for a in installs)


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_generated():
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    copied = {a.split()[-2] for i, a in instructions() if i == "COPY" and "--from" not in a}
    # bind mounts of the build context (those with from= mount another stage)
    copied |= set(re.findall(r"--mount=type=bind,source=([^,\s]+),target=", DOCKERFILE.read_text()))
    copied |= {"pyproject.toml", "README.md"}
    for path in copied - {"./"}:
        assert f"!{path.rstrip('/')}/" in ignore or f"!{path}" in ignore, path
    assert "*" in ignore
    assert {"proto/convray/*/*_pb2*.py", "proto/convray/*/*_pb2*.pyi"} <= set(ignore)  # every API's host stubs


@pytest.mark.integration
def test_the_healthcheck_command_passes_on_a_serving_server_and_fails_without_one(served):
    argv = [sys.executable, *healthcheck_argv()[1:]]
    assert healthcheck_argv()[0] == "python"
    env = {**os.environ, "CONVRAY_SERVER__PORT": str(served.server.port)}
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["CONVRAY_SERVER__PORT"] = str(s.getsockname()[1])  # bound, not listening: nothing answers
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0


@contextlib.contextmanager
def health_service() -> Iterator[tuple[int, Any]]:
    """A plain gRPC health service on a loopback port, SERVING: (its port, its servicer, to change that)."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(None)


def test_the_healthcheck_asks_the_health_only_port_when_one_is_set():
    """With TLS on the gRPC port the plaintext check can only pass there (CONVRAY_SERVER__HEALTH_PORT)."""
    from grpc_health.v1 import health_pb2

    argv = [sys.executable, *healthcheck_argv()[1:]]
    with health_service() as (port, servicer), socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))  # bound, not listening: the gRPC port answers nothing
        env = {**os.environ, "CONVRAY_SERVER__PORT": str(silent.getsockname()[1])}
        env["CONVRAY_SERVER__HEALTH_PORT"] = str(port)
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 1


def test_the_healthcheck_asks_the_grpc_port_when_the_health_port_is_off():
    """CONVRAY_SERVER__HEALTH_PORT=off (documented) made it dial 127.0.0.1:off: the container was always unhealthy."""
    argv = [sys.executable, *healthcheck_argv()[1:]]
    with health_service() as (port, _):
        for off in ("off", "0", ""):
            env = {**os.environ, "CONVRAY_SERVER__PORT": str(port), "CONVRAY_SERVER__HEALTH_PORT": off}
            assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0, off


def test_every_image_installs_the_train_extra_the_training_job_needs():
    """One image runs `convray serve` and the RayJob's `convray train` (Ray Train, Data and Tune), issue #8."""
    installs = [a for i, a in instructions() if i == "RUN" and "/wheels/convray-" in a]
    assert len(installs) == 2  # cpu and cuda
    for install in installs:
        assert re.search(r"convray-\S+\.whl\[train\]", install), install
        assert re.search(r"ray\[[a-z,]*\btrain\b[a-z,]*\]==", install), install
