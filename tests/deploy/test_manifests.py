"""deploy/k8s builds with kustomize, and every object is valid for Kubernetes and for the operators' CRDs."""

from __future__ import annotations

import pytest

from tests.deploy.conftest import ALL_BUILDS
from tests.deploy.crd_fields import CUSTOM_KINDS, LABEL_SELECTOR, POD_TEMPLATE, REQUIRED, RESOURCES, Enum, MapOf

pytestmark = pytest.mark.deploy

# The oldest Kubernetes deploy/k8s is written for (native gRPC probes, autoscaling/v2, policy/v1 and
# appProtocol kubernetes.io/h2c are all there by 1.30) and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]


def kubernetes_errors(obj: dict, version: str) -> str | None:
    """None when ``obj`` is valid (strictly: no unknown fields) for that Kubernetes version, else why not."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"
    return None


def custom_errors(value: object, expected: object, path: str, version: str) -> list[str]:
    """Where ``value`` departs from the fixture's description ``expected`` (see crd_fields.py)."""
    if expected == POD_TEMPLATE:
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": value}
        error = kubernetes_errors(wrapped, version)
        return [f"{path} (PodTemplateSpec): {error}"] if error else []
    if expected == RESOURCES:
        wrapped = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}}
        wrapped["spec"] = {"containers": [{"name": "c", "image": "i", "resources": value}]}
        error = kubernetes_errors(wrapped, version)
        return [f"{path} (ResourceRequirements): {error}"] if error else []
    if expected == LABEL_SELECTOR:
        ok = isinstance(value, dict) and set(value) <= {"matchLabels", "matchExpressions"}
        return [] if ok else [f"{path}: not a LabelSelector: {value!r}"]
    if isinstance(expected, MapOf):
        if not isinstance(value, dict):
            return [f"{path}: expected a map, got {value!r}"]
        return [e for k, v in value.items() for e in custom_errors(v, expected.value, f"{path}.{k}", version)]
    if isinstance(expected, Enum):
        return [] if value in expected.values else [f"{path}: {value!r} is not one of {expected.values}"]
    if isinstance(expected, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [e for i, item in enumerate(value) for e in custom_errors(item, expected[0], f"{path}[{i}]", version)]
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {value!r}"]
        errors = [f"{path}: required field {key!r} missing" for key in expected.get(REQUIRED, []) if key not in value]
        for key, item in value.items():
            if key not in expected or key == REQUIRED:
                errors.append(f"{path}.{key}: not a field we know (add it to tests/deploy/crd_fields.py from the docs)")
            else:
                errors.extend(custom_errors(item, expected[key], f"{path}.{key}", version))
        return errors
    # A Python type (or tuple of types); bool is an int in Python, so keep them apart.
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in types:
        return [f"{path}: expected {expected}, got a boolean"]
    return [] if isinstance(value, types) else [f"{path}: expected {expected}, got {value!r}"]


@pytest.mark.parametrize("name", ALL_BUILDS)
def test_kustomize_builds_every_overlay(built, name):
    assert built[name], f"{name} builds to nothing"
    for obj in built[name]:
        assert obj["metadata"].get("namespace") == "convray" or obj["kind"] == "Namespace", obj["metadata"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", ALL_BUILDS)
def test_kubernetes_kinds_validate_against_the_openapi_schemas(built, name, version):
    """Strict validation: a misspelt or misplaced field fails, not only a wrong type."""
    checked = [obj for obj in built[name] if obj["kind"] not in CUSTOM_KINDS]
    errors = {f"{o['kind']}/{o['metadata']['name']}": kubernetes_errors(o, version) for o in checked}
    assert not {k: v for k, v in errors.items() if v}, errors
    if not name.startswith("train"):
        assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= {
            o["kind"] for o in checked
        }


@pytest.mark.parametrize("name", ALL_BUILDS)
def test_custom_kinds_use_only_the_documented_crd_fields(built, name):
    """KubeRay and Prometheus Operator objects against tests/deploy/crd_fields.py; pod templates against core/v1."""
    custom = [obj for obj in built[name] if obj["kind"] in CUSTOM_KINDS]
    assert custom
    for obj in custom:
        api_version, spec = CUSTOM_KINDS[obj["kind"]]
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["apiVersion"] == api_version, where
        assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, where
        errors = custom_errors(obj["spec"], spec, f"{where}.spec", KUBERNETES_VERSIONS[-1])
        assert not errors, "\n".join(errors)


def test_the_fixture_catches_a_wrong_field():
    """The CRD check is not vacuous: an unknown field, a wrong type and a bad pod template all fail."""
    _, spec = CUSTOM_KINDS["RayCluster"]
    bad = {
        "headGroupSpec": {"rayStartParams": {"num-cpus": 0}, "template": {"spec": {"containerz": []}}},
        "workerGroupSpecs": [{"groupName": "g", "minReplicas": 1, "maxReplicas": "2", "template": {}}],
        "rayVersoin": "2.60.0",
    }
    errors = "\n".join(custom_errors(bad, spec, "spec", KUBERNETES_VERSIONS[-1]))
    assert "rayVersoin: not a field we know" in errors
    assert "num-cpus: expected" in errors
    assert "maxReplicas: expected" in errors
    assert "PodTemplateSpec" in errors
