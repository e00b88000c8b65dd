"""Prometheus counters of usage per key name, read from the usage rows at scrape time.

The rows are the one count every process shares (API processes and workers alike), so any
process's /metrics shows the same totals; they only grow (usage rows are never deleted).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["UsageCollector"]

log = logging.getLogger(__name__)

HELP = {
    "images": "Images generated, by key name.",
    "pixel_steps": "Width x height x steps x images generated, by key name.",
    "audio_seconds": "Seconds of audio transcribed, by key name.",
    "device_seconds": "Seconds of model work, by key name.",
}


class UsageCollector(Collector):
    """``s2i_usage_<metric>_total{key=...}``: never a secret, a key's name or owner digest."""

    def __init__(self, accounts: Any) -> None:
        self.accounts = accounts

    def describe(self) -> list[Metric]:
        """No samples at registration (no database read then)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """One counter per metric, one sample per key."""
        try:
            totals = self.accounts.usage_by_owner()
            names = self.accounts.keys.names(list(totals))
        except Exception:  # the database is away: /metrics still answers
            log.warning("cannot read usage for /metrics", exc_info=True)
            return
        for metric, help_text in HELP.items():
            family = CounterMetricFamily(f"s2i_usage_{metric}", help_text, labels=["key"])
            for owner, use in totals.items():
                family.add_metric([names.get(owner, owner)], use[metric])
            yield family
