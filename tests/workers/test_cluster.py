"""Connecting to Ray: what this process keeps while Ray starts in it."""

import logging
import signal
import sys

import ray

from convray.workers import cluster


def test_while_ray_starts_this_process_keeps_its_sigterm_handler_instead_of_rays():
    """ray.init installs its handlers through ray._private.utils.set_sigterm_handler; a SystemExit they raised
    inside code that swallows exceptions lost a --frontends supervisor's stop signal."""

    def ours(*_):
        pass

    def rays(signum, _):
        sys.exit(signum)

    before = signal.signal(signal.SIGTERM, ours)
    try:
        with cluster.own_sigterm_handler():
            ray._private.utils.set_sigterm_handler(rays)
            assert signal.getsignal(signal.SIGTERM) is ours
        ray._private.utils.set_sigterm_handler(rays)  # outside, Ray's own function again
        assert signal.getsignal(signal.SIGTERM) is rays
    finally:
        signal.signal(signal.SIGTERM, before)


def test_rays_notice_that_it_turned_token_authentication_on_is_dropped_and_its_warning_that_it_is_off_kept(caplog):
    from ray._private.authentication import authentication_token_setup as ray_auth  # Ray's own warnings

    with caplog.at_level(logging.WARNING):
        ray_auth._warn_token_auth_enabled()
        ray_auth._warn_token_auth_disabled()
    assert [record.getMessage()[:43] for record in caplog.records] == ["Token authentication is disabled for this R"]


def test_a_join_that_timed_out_names_token_authentication_as_a_cause_for_a_cluster_joined_not_started(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.join_timeout_hint(None) == ""  # an embedded Ray: this process starts it, with its own token
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert "refuses a process without its token (RAY_AUTH_MODE=token" in cluster.join_timeout_hint("head:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert "refuses a process without its token" in cluster.join_timeout_hint("head:6379")  # the mode alone
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 32)  # this process has a token: the cluster's may be another
    assert "refuses a token that is not its own (RAY_AUTH_TOKEN" in cluster.join_timeout_hint("head:6379")
