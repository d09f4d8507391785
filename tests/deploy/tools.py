"""Helpers for the observability tests: scraping /metrics, and finding Prometheus' own binaries."""

from __future__ import annotations

import os
import shutil
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families


def scrape_text(port: int) -> str:
    """The exposition text of the metrics endpoint on 127.0.0.1:``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


class Scrape:
    """One scrape, parsed: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value, or 0 when the series is not exported (yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        """Whether the series is exported."""
        return (name, frozenset(labels.items())) in self.samples

    def names(self) -> set[str]:
        """Every sample name in the scrape (with _total, _bucket, _sum, _count, _info suffixes)."""
        return {name for name, _ in self.samples}


def scrape(port: int) -> Scrape:
    """Scrape and parse the metrics endpoint on 127.0.0.1:``port``."""
    return Scrape(scrape_text(port))


def prometheus_binary(name: str) -> str:
    """The path of ``promtool`` or ``prometheus`` (Debian's prometheus package); skip without it,
    except under CI (CI=true), where .ci/run installs it and its absence is a failure."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} not found: .ci/run installs Debian's prometheus package, which ships it")
        pytest.skip(f"{name} not found: install Debian's prometheus package (apt-get install prometheus)")
    return path
