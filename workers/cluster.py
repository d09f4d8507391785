"""Connecting to Ray: join a cluster by address, or start an embedded local one."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

NAMESPACE = "convray"


def _not_the_sigterm_notice(record: logging.LogRecord) -> bool:
    """Drops Ray's warning that ``ray.init`` off the main thread set no SIGTERM handler.

    convray handles stop signals itself (a server drains on SIGTERM), so the warning, on every start, read as if
    stopping would not work (found in a docs walkthrough).
    """
    return not record.getMessage().startswith("SIGTERM handler is not set")


def _not_the_token_auth_notice(record: logging.LogRecord) -> bool:
    """Drops Ray's warning, at every start of a local Ray, that it turned token authentication on by default.

    Ray 2.60 does this for a new local cluster whose RAY_AUTH_MODE is unset, and the warning ("Set
    RAY_AUTH_MODE=disabled to opt out") read as a problem to fix. Setting RAY_AUTH_MODE=token ourselves would
    not do: Ray reads its config once, at import, and then refuses its own GCS. Ray's warning that
    authentication is *off* is kept.
    """
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


logging.getLogger("ray._private.worker").addFilter(_not_the_sigterm_notice)
logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_the_token_auth_notice)


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


def join_timeout_hint(address: str | None) -> str:
    """What to add when joining the cluster at ``address`` timed out: a cause Ray reports only in its own log.

    A cluster with Ray token authentication refuses a process without its token, and Ray retries the refusal
    (logging ``InvalidAuthToken``) until the timeout instead of failing: the message would otherwise blame
    only the address. Empty for an embedded Ray, which this process starts with its own token.
    """
    if started_here(address):
        return ""
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_MODE") == "token" and has_token:
        return (
            "; a cluster with Ray token authentication also refuses a token that is not its own "
            "(RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH; Ray then logs InvalidAuthToken)"
        )
    return (
        "; a cluster with Ray token authentication also refuses a process without its token "
        "(RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH; Ray then logs InvalidAuthToken)"
    )


def shortfall(count: int, each: dict[str, float]) -> tuple[str, float, float] | None:
    """The first resource the connected cluster has too little of in all for ``count`` actors asking ``each``.

    ``each`` is e.g. {"CPU": 1, "GPU": 0}; the answer is (resource, asked in all, the cluster's total), or None
    if all fit. Only final on a Ray no node can join (an embedded one): elsewhere an autoscaler may add nodes.
    """
    total = ray.cluster_resources()
    for resource, per_actor in each.items():
        asked, has = count * per_actor, total.get(resource, 0.0)
        if asked > has:
            return resource, asked, has
    return None


def started_here(address: str | None) -> bool:
    """Whether ``connect(address)`` starts (or started) an embedded Ray rather than joining one.

    So when no address is given, here or in RAY_ADDRESS (which ``ray.init`` honours too).
    """
    return not (address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def own_sigterm_handler() -> Iterator[None]:
    """While Ray starts on this thread, keep this process's SIGTERM handler instead of taking Ray's.

    On the main thread, ``ray.init`` puts in handlers of its own: the driver's raises SystemExit, and an
    embedded head's drains the node for up to 30 s, kills it and raises SystemExit. Raised inside code that
    swallows exceptions (seen: logging's after-fork hook, as Ray started a process), the stop was lost and
    the process carried on as if no signal had come. Kept, the caller's handler notes the signal, and the
    caller acts on it once ``ray.init`` has returned.
    """
    utils = ray._private.utils  # noqa: SLF001 (Ray installs its handlers through this one function)
    install = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = install


# Ray's own driver-side limit: a driver whose GCS stays unreachable this long logs "Failed to connect to
# GCS within N seconds ... The program will terminate" and exits (RAY_gcs_rpc_server_reconnect_timeout_s).
RAY_GCS_RECONNECT_TIMEOUT_S = float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", "60"))
_PROBE_KEY = b"convray-probe"


class RayClusterReplaced(Exception):
    """The GCS at the joined address answers, but it is a new cluster: this driver's session is gone."""


def check_gcs(timeout_s: float) -> None:
    """One cheap round trip to the joined cluster's GCS (an internal KV read), waiting at most ``timeout_s``.

    Blocking; run it off the event loop.

    Raises:
        RayClusterReplaced: a new cluster answers at the address (Ray says WrongClusterID).
        Exception: the GCS did not answer in time (Ray raises RpcError) or this process is not connected.
    """
    if not ray.is_initialized():
        raise ConnectionError("this process is not connected to Ray")
    gcs = ray._private.worker.global_worker.gcs_client  # noqa: SLF001 (the driver's own GCS client)
    try:
        gcs.internal_kv_get(_PROBE_KEY, NAMESPACE.encode(), timeout=timeout_s)
    except ray.exceptions.AuthenticationError as exc:
        if "WrongClusterID" in str(exc):
            raise RayClusterReplaced(str(exc).split("\n", 1)[0]) from None
        raise


def disconnect() -> None:
    """Leave the cluster (stopping an embedded one). Also disarms Ray's reconnect timeout above."""
    ray.shutdown()
