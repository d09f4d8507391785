"""`--frontends N`: the settings each front end gets, the resource check, and the port sharing it relies on.

The processes themselves, started by the real CLI, are in tests/e2e/test_frontends.py.
"""

import pytest
from pydantic import ValidationError

from convray.service.config import ServerSettings, Settings
from convray.service.frontends import FrontendMember, frontend_settings, missing_resources
from convray.service.server import grpc_server_options, where_ray_is


def test_front_ends_get_consecutive_metrics_ports_join_the_given_ray_and_run_alone():
    settings = Settings(server={"port": 7000, "metrics_port": 9100, "frontends": 3}, workers={"replicas": 2})
    each = [frontend_settings(settings, i, "10.0.0.1:6379") for i in range(3)]
    assert [s.server.metrics_port for s in each] == [9100, 9101, 9102]
    assert all(s.server.port == 7000 and s.server.frontends == 1 for s in each)
    assert all(s.workers.ray_address == "10.0.0.1:6379" and s.workers.replicas == 2 for s in each)
    assert settings.server.frontends == 3 and settings.workers.ray_address is None  # the group's own are untouched


@pytest.mark.parametrize("metrics_port", [0, None])
def test_a_metrics_port_picked_at_random_or_switched_off_stays_so_for_every_front_end(metrics_port):
    settings = Settings(server={"port": 7000, "metrics_port": metrics_port, "frontends": 2})
    assert [frontend_settings(settings, i, "x:1").server.metrics_port for i in range(2)] == [metrics_port] * 2


@pytest.mark.parametrize(
    ("server", "complaint"),
    [
        ({"port": 0, "frontends": 2}, "needs fixed ports"),
        ({"port": 7000, "health_port": 0, "frontends": 2}, "needs fixed ports"),
        ({"port": 7000, "metrics_port": 65535, "frontends": 2}, "metrics ports 65535-65536, past 65535"),
        ({"port": 9101, "metrics_port": 9100, "frontends": 4}, "metrics ports 9100-9103 include --port 9101"),
        ({"health_port": 9101, "metrics_port": 9100, "frontends": 3}, "9100-9102 include --health-port 9101"),
        ({"frontends": 0}, "greater than or equal to 1"),
        ({"frontends": 65}, "less than or equal to 64"),
    ],
)
def test_settings_that_front_ends_could_not_share_are_refused(server, complaint):
    with pytest.raises(ValidationError, match=complaint):
        ServerSettings(**server)


def test_one_front_end_may_still_pick_a_port_at_random():
    assert ServerSettings(port=0, frontends=1).port == 0


def test_replicas_that_fit_the_cluster_pass_the_check():
    settings = Settings(server={"frontends": 4}, workers={"cpus_per_replica": 1, "gpus_per_replica": 0.25})
    assert missing_resources(settings, 1, {"CPU": 4.0, "GPU": 1.0}) is None


def test_the_check_names_what_is_short_and_the_flag_that_sets_it():
    cpus = Settings(server={"frontends": 3}, workers={"replicas": 1, "cpus_per_replica": 1})
    assert missing_resources(cpus, 1, {"CPU": 2.0}) == (
        "3 front ends x 1 model(s) x 1 replica(s) x 1 CPU (--cpus-per-replica) = 3 CPU, but the Ray cluster has 2"
    )
    gpus = Settings(server={"frontends": 4}, workers={"replicas": 2, "cpus_per_replica": 0, "gpus_per_replica": 0.25})
    assert missing_resources(gpus, 2, {"CPU": 16.0, "GPU": 1.0}) == (
        "4 front ends x 2 model(s) x 2 replica(s) x 0.25 GPU (--gpus-per-replica, 4 to a GPU) = 4 GPU, "
        "but the Ray cluster has 1"
    )
    assert "has 0" in missing_resources(gpus, 1, {"CPU": 16.0})  # no GPU in the cluster at all


@pytest.mark.parametrize(
    ("frontends", "models", "share", "gpus", "fits"),
    [
        (3, 1, 0.6, 2, False),  # one 0.6 to a GPU: 3 need 3 GPUs, though 1.8 in all
        (3, 1, 0.6, 3, True),
        (2, 2, 0.75, 3, False),  # 4 replicas of 0.75, one to a GPU: 4 GPUs
        (4, 1, 0.25, 1, True),
        (5, 1, 0.25, 1, False),
        (2, 1, 1, 2, True),  # whole GPUs
        (3, 1, 1, 2, False),
    ],
)
def test_gpu_shares_below_one_pack_whole_replicas_onto_each_gpu(frontends, models, share, gpus, fits):
    settings = Settings(server={"frontends": frontends}, workers={"cpus_per_replica": 0, "gpus_per_replica": share})
    assert (missing_resources(settings, models, {"CPU": 8.0, "GPU": float(gpus)}) is None) == fits


def test_a_port_something_else_listens_on_is_refused_even_if_it_allows_sharing():
    """gRPC servers, and other groups, listen with SO_REUSEPORT, which the front ends would quietly share."""
    import socket

    from convray.service.frontends import _ports_taken

    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        settings = Settings(server={"host": "127.0.0.1", "port": port, "frontends": 2, "metrics_port": None})
        assert "cannot serve on 127.0.0.1:" in _ports_taken(settings)
    assert _ports_taken(settings) is None  # closed: free again
    spelt = Settings(server={"host": "[::]", "port": port, "frontends": 2, "metrics_port": None})
    assert _ports_taken(spelt) is None  # gRPC's spelling


def test_a_metrics_port_of_one_of_the_front_ends_that_is_taken_is_refused_before_anything_starts():
    """Found in review: the second front end failed on it only after Ray had started, seconds in."""
    import socket

    from convray.service.frontends import _ports_taken

    with socket.socket() as grpc_port, socket.socket() as other:
        grpc_port.bind(("127.0.0.1", 0))  # held (not listening) so no one else takes it meanwhile
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        server = {"host": "127.0.0.1", "port": grpc_port.getsockname()[1], "frontends": 2, "metrics_host": "127.0.0.1"}
        grpc_port.close()
        settings = Settings(server={**server, "metrics_port": taken})  # the first front end's; the second's is next
        assert (
            _ports_taken(settings)
            == f"cannot serve on 127.0.0.1:{taken}: Address already in use (another server there?)"
        )


def test_only_the_front_ends_of_a_group_share_their_port():
    assert dict(grpc_server_options(ServerSettings()))["grpc.so_reuseport"] == 0
    assert dict(grpc_server_options(ServerSettings(), share_port=True))["grpc.so_reuseport"] == 1


@pytest.mark.parametrize(
    ("ray_address", "member", "named", "flags"),
    [
        (None, None, "an embedded local Ray", "--ray-connect-timeout-s"),
        ("10.0.0.1:6379", None, "10.0.0.1:6379", "--ray-address, --ray-connect-timeout-s"),
        ("10.0.0.1:6379", FrontendMember(0, 2, ray_embedded=False), "10.0.0.1:6379",
         "--ray-address, --ray-connect-timeout-s"),
        ("10.0.0.1:6379", FrontendMember(1, 2, ray_embedded=True), "the Ray started for the group at 10.0.0.1:6379",
         "--ray-connect-timeout-s"),
    ],
)  # fmt: skip
def test_a_front_end_that_cannot_reach_ray_names_it_by_the_flags_the_user_gave(ray_address, member, named, flags):
    """A group's front ends join their supervisor's embedded Ray by address, but the user gave no --ray-address."""
    assert where_ray_is(Settings(workers={"ray_address": ray_address}).workers, member) == (named, flags)
