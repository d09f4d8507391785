"""The fields of the custom resources deploy/k8s uses, written down so the manifests can be checked offline.

Kubernetes' own kinds are checked against its OpenAPI schemas (kubernetes-validate); these custom kinds
have no schema there. Sources:

- KubeRay ``ray.io/v1`` (RayCluster, RayJob): the CRDs ``ray-operator/config/crd/bases/ray.io_rayclusters.yaml``
  and ``ray.io_rayjobs.yaml`` of KubeRay v1.7.0 (fields, types, enums and required lists copied from their
  openAPIV3Schema), and the KubeRay API reference.
- Prometheus Operator ``monitoring.coreos.com/v1`` (ServiceMonitor, PodMonitor, PrometheusRule): written from
  the Prometheus Operator API reference as known to the author, not from a CRD file.

Only the fields deploy/k8s uses (and their required siblings) are listed: a field missing here is an error,
so adding one means looking it up first. Notation: a dict is an object (``REQUIRED`` lists its required keys);
a one-item list is an array of that; ``MapOf(t)`` is a map of string keys; ``Enum(...)`` is a string from a
set; ``POD_TEMPLATE`` is a core/v1 PodTemplateSpec (validated by the Kubernetes schema); ``RESOURCES`` a
core/v1 ResourceRequirements; ``LABEL_SELECTOR`` a meta/v1 LabelSelector.
"""

from __future__ import annotations

from dataclasses import dataclass

REQUIRED = "__required__"
POD_TEMPLATE = "PodTemplateSpec"
RESOURCES = "ResourceRequirements"
LABEL_SELECTOR = "LabelSelector"


@dataclass(frozen=True)
class MapOf:
    """A map from string keys to values of one type."""

    value: object


@dataclass(frozen=True)
class Enum:
    """A string with a fixed set of values."""

    values: tuple[str, ...]


# KubeRay v1.7.0: rayStartParams is map[string]string; replicas/minReplicas/maxReplicas int32.
_HEAD_GROUP = {
    REQUIRED: ["template"],
    "rayStartParams": MapOf(str),
    "template": POD_TEMPLATE,
}
_WORKER_GROUP = {
    REQUIRED: ["groupName", "maxReplicas", "minReplicas", "template"],
    "groupName": str,
    "replicas": int,
    "minReplicas": int,
    "maxReplicas": int,
    "rayStartParams": MapOf(str),
    "template": POD_TEMPLATE,
}
_RAY_CLUSTER_SPEC = {
    REQUIRED: ["headGroupSpec"],
    "rayVersion": str,
    "enableInTreeAutoscaling": bool,
    "autoscalerOptions": {
        "upscalingMode": Enum(("Default", "Aggressive", "Conservative")),
        "idleTimeoutSeconds": int,
        "resources": RESOURCES,
    },
    "headGroupSpec": _HEAD_GROUP,
    "workerGroupSpecs": [_WORKER_GROUP],
    # From the KubeRay API reference (AuthOptions, KubeRay v1.6.2); secretName since v1.6.0.
    "authOptions": {"mode": Enum(("disabled", "token")), "secretName": str, "enableK8sTokenAuth": bool},
}

_RULE = {
    "alert": str,
    "record": str,
    "expr": str,
    "for": str,
    "labels": MapOf(str),
    "annotations": MapOf(str),
}
_SCRAPE_ENDPOINT = {"port": str, "path": str, "interval": str}

# kind -> (apiVersion, spec fields)
CUSTOM_KINDS: dict[str, tuple[str, dict]] = {
    "RayCluster": ("ray.io/v1", _RAY_CLUSTER_SPEC),
    "RayJob": (
        "ray.io/v1",
        {
            # RayJob's spec has no required list in v1; without clusterSelector it needs rayClusterSpec.
            REQUIRED: ["entrypoint", "rayClusterSpec"],
            "entrypoint": str,
            "entrypointNumCpus": (int, float),
            "shutdownAfterJobFinishes": bool,
            "ttlSecondsAfterFinished": int,
            "activeDeadlineSeconds": int,
            "submissionMode": Enum(("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")),
            "rayClusterSpec": _RAY_CLUSTER_SPEC,
        },
    ),
    "ServiceMonitor": (
        "monitoring.coreos.com/v1",
        {REQUIRED: ["selector"], "selector": LABEL_SELECTOR, "jobLabel": str, "endpoints": [_SCRAPE_ENDPOINT]},
    ),
    "PodMonitor": (
        "monitoring.coreos.com/v1",
        {REQUIRED: ["selector"], "selector": LABEL_SELECTOR, "podMetricsEndpoints": [_SCRAPE_ENDPOINT]},
    ),
    "PrometheusRule": (
        "monitoring.coreos.com/v1",
        {"groups": [{REQUIRED: ["name"], "name": str, "rules": [_RULE]}]},
    ),
}
