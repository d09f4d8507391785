"""tests/bench/cpu_breakdown.py: which part of a loaded node each process is, and the CPU it has used."""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import pytest

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("cpu_breakdown", REPO_ROOT / "tests" / "bench" / "cpu_breakdown.py")
cpu_breakdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_breakdown)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_processes_are_told_apart_by_their_names_then_by_whom_they_descend_from():
    table = {  # pid: (parent, name, command line)
        10: (1, "convray", "python convray serve --frontends 2"),
        11: (10, "python3", "python -c from multiprocessing.spawn import spawn_main"),  # a front end
        12: (10, "raylet", "/site/ray/core/src/ray/raylet/raylet --node_id"),
        13: (12, "ray::ModelRunne", "ray::ModelRunner"),
        14: (12, "python", "python /site/ray/_private/log_monitor.py"),
        15: (12, "ray::IDLE", "ray::IDLE"),
        20: (1, "convray", "python convray bench --processes 2"),
        21: (20, "python3", "python -c from multiprocessing.spawn import spawn_main"),  # a client process
        30: (1, "py-spy", "py-spy record -p 11"),
        40: (1, "bash", "bash"),
    }
    kinds = {pid: cpu_breakdown.kind_of(pid, table, server=10, client=20) for pid in table}
    assert kinds == {
        10: "front end",
        11: "front end",
        12: "ray",
        13: "replica",
        14: "ray",
        15: "ray",
        20: "client",
        21: "client",
        30: "profiler",
        40: "other",
    }


def test_this_process_is_in_the_table_under_its_parent_with_the_cpu_it_has_used():
    table = cpu_breakdown.process_table()
    assert table[os.getpid()][0] == os.getppid()
    before, deadline = cpu_breakdown.cpu_ticks(os.getpid()), time.monotonic() + 5
    while cpu_breakdown.cpu_ticks(os.getpid()) == before and time.monotonic() < deadline:
        sum(range(100_000))  # CPU until the next clock tick is counted
    assert cpu_breakdown.cpu_ticks(os.getpid()) > before
    assert cpu_breakdown.cpu_ticks(2**22 + 12345) == 0  # gone (or never there): nothing
