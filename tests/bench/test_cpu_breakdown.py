"""tests/bench/cpu_breakdown.py: which part of a loaded node each process is, and the CPU it has used."""

from __future__ import annotations

import os
import sys
import threading
import time

import psutil
import pytest

from tests.bench import cpu_breakdown

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names come from /proc")


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
    me = psutil.Process()
    before, deadline = cpu_breakdown.cpu_seconds(me), time.monotonic() + 5
    while cpu_breakdown.cpu_seconds(me) == before and time.monotonic() < deadline:
        sum(range(100_000))  # CPU until the next clock tick is counted
    assert cpu_breakdown.cpu_seconds(me) > before


def test_cores_count_each_kind_over_the_window_a_new_process_from_zero_and_an_exited_one_is_reported():
    Sample = cpu_breakdown.Sample
    before = {1: Sample("front end", 10.0), 2: Sample("replica", 4.0), 3: Sample("client", 7.0)}
    after = {1: Sample("front end", 13.0), 2: Sample("replica", 5.5), 4: Sample("front end", 1.0)}  # 3 exited
    cores, exited = cpu_breakdown.cores_by_kind(before, after, elapsed_s=2.0)
    assert cores == {"front end": 2.0, "replica": 0.75}  # (3 + 1) / 2 and 1.5 / 2; the client's seconds are lost
    assert exited == {"client": 1}


def test_a_snapshot_finds_this_process_with_its_cpu_and_its_threads_by_name():
    processes, threads = cpu_breakdown.snapshot(server=os.getpid(), client=-1)  # this process as the "server"
    me = processes[os.getpid()]
    assert me.kind == "front end" and me.cpu_s > 0
    main = threads[(os.getpid(), threading.get_native_id())]  # the main thread's id is the process's
    assert main.kind and main.cpu_s > 0  # its name, as the kernel has it, and its CPU seconds
