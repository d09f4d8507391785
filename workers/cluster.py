"""Connecting to Ray: join a cluster by address, or start an embedded local one."""

from __future__ import annotations

import ray

NAMESPACE = "convray"


def connect(address: str | None, num_cpus: int | None = None, log_to_driver: bool = False) -> str:
    """Join the Ray cluster at ``address``, or start a local one; reuse a live connection.

    An embedded Ray has no dashboard. Ray registers its processes under this machine's own address
    (it deliberately resolves localhost to it), so that address, not 127.0.0.1, appears in its logs.
    ``log_to_driver`` prints the job's actors' output here (the training job's per-epoch lines).

    Returns:
        The address of the cluster's GCS, for other drivers (``--ray-address``) to join.
    """
    if not ray.is_initialized():
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=log_to_driver)
        else:
            ray.init(
                num_cpus=num_cpus,
                namespace=NAMESPACE,
                include_dashboard=False,
                log_to_driver=log_to_driver,
            )
    return str(ray.get_runtime_context().gcs_address)
