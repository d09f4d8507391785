"""The one mapping of exceptions onto gRPC statuses, and the retry advice an overload carries."""

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from convray.service.errors import (
    DeadlineExpired,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    status_trailers,
    to_status,
)
from convray.service.metrics import Metrics


@pytest.mark.parametrize(
    "exc,code",
    [
        (InvalidInput("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFound("nope"), grpc.StatusCode.NOT_FOUND),
        (ModelNotReady("later"), grpc.StatusCode.UNAVAILABLE),
        (Overloaded("full", retry_after_s=0.25), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExpired("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (asyncio.CancelledError(), grpc.StatusCode.CANCELLED),
        # A wait inside the server ran out, not the client's deadline: retryable, not the caller's doing.
        (TimeoutError("GCS did not answer"), grpc.StatusCode.UNAVAILABLE),
        (asyncio.TimeoutError(), grpc.StatusCode.UNAVAILABLE),  # noqa: UP041 (its own class on Python 3.10)
        (KeyError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_exception_maps_to_a_status_that_says_what_happened(exc, code):
    assert to_status(exc)[0] == code


def test_a_lost_replica_is_unavailable_and_says_which_replica_and_why_in_one_line():
    """Found in review: the message named only the class, and the front end logged a traceback at error."""
    from convray.workers.pool import ReplicaStuck

    why = "replica digits-0 did not answer a batch within 30 s (--batch-timeout-s); it is being restarted"
    code, message = to_status(ReplicaStuck(why))
    assert (code, message) == (grpc.StatusCode.UNAVAILABLE, f"model replica unavailable, retry: ReplicaStuck ({why})")
    code, message = to_status(ReplicaStuck("first line\n  details over\n  many lines"))
    assert message.endswith("ReplicaStuck (first line)")


def test_a_lost_replica_is_logged_as_a_warning_without_a_traceback(caplog):
    from convray.service.rpc import RpcObserver
    from convray.workers.pool import ReplicaStuck

    exc = ReplicaStuck("replica digits-0 did not answer")
    RpcObserver("native", Metrics(CollectorRegistry()), lambda name: name)._log(
        "Classify", "digits", exc, *to_status(exc)
    )
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.exc_info is None


def test_a_timeout_inside_the_server_says_so_and_asks_for_a_retry():
    code, message = to_status(TimeoutError("GCS did not answer"))
    assert message == "timed out inside the server (TimeoutError: GCS did not answer); retry"


def test_an_overload_tells_the_client_when_to_retry_in_both_forms_clients_read():
    exc = Overloaded("queue full; retry in about 250 ms", retry_after_s=0.25)
    trailers = dict(status_trailers(exc, *to_status(exc)))
    assert trailers["grpc-retry-pushback-ms"] == "250"  # gRPC's built-in retries wait this long
    rich = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert rich.message == "queue full; retry in about 250 ms"  # grpcio-status checks it equals the details
    (detail,) = rich.details
    retry_info = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry_info)
    assert retry_info.retry_delay.ToNanoseconds() == 250_000_000


@pytest.mark.parametrize("exc", [Overloaded("full"), InvalidInput("bad"), KeyError("x")])
def test_other_failures_carry_no_retry_advice(exc):
    assert status_trailers(exc, *to_status(exc)) == ()
