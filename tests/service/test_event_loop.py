"""service.event_loop: which event loop a front end runs on."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import uvloop

from convray.service import cli, event_loop
from convray.service.exit_codes import EXIT_USAGE


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_means_uvloop_where_it_is_installed_and_asyncio_where_not(monkeypatch):
    assert event_loop.resolve("auto") == "uvloop"
    assert event_loop.resolve("asyncio") == "asyncio"

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # as on Windows: no uvloop build
    assert event_loop.resolve("auto") == "asyncio"


def test_asking_for_uvloop_where_it_is_not_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(RuntimeError, match=r"--event-loop uvloop, but uvloop is not installed \(pip install uvloop"):
        event_loop.resolve("uvloop")


def test_serve_asked_for_uvloop_where_it_is_not_installed_exits_2_before_starting_anything(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    assert cli.main(["serve", "--event-loop", "uvloop", "--port", "0", "--no-metrics"]) == EXIT_USAGE
    assert "convray serve: --event-loop uvloop, but uvloop is not installed" in capsys.readouterr().err


@pytest.mark.parametrize(("choice", "module"), [("uvloop", uvloop.Loop.__module__), ("asyncio", "asyncio.unix_events")])
def test_the_server_coroutine_runs_on_the_chosen_loop(choice, module):
    assert event_loop.run(_loop_module(), choice) == module
