"""Connecting to Ray: what this process keeps while Ray starts in it."""

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
