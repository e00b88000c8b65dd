"""Quotas: daily and monthly caps per key on images, pixel-steps and audio seconds.

A request is checked at admission, before any model work: what the key used in the period
(its usage rows) plus what its admitted jobs reserved (their kind's estimate) plus this
request's estimate must stay within each cap. Reservations are counted in one place per
deployment: this process in the embedded mode, Redis in the distributed mode (atomic
``INCRBYFLOAT`` per key, metric and period window, seeded from the usage rows), so every API
process sees the others' admissions.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "METRICS",
    "PERIODS",
    "MemoryCounter",
    "QuotaExceeded",
    "Quotas",
    "RedisCounter",
    "parse_quotas",
    "period_window",
]

METRICS = ("images", "pixel_steps", "audio_seconds")
PERIODS = ("day", "month")


def parse_quotas(text: str) -> dict[str, float]:
    """``images:day=100,pixel_steps:month=5e9`` as a dict; ValueError naming a bad entry."""
    quotas: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, cap = item.partition("=")
        metric, _, period = name.strip().partition(":")
        if metric not in METRICS or period not in PERIODS:
            raise ValueError(
                f"{item!r}: expected METRIC:PERIOD=CAP with METRIC one of {', '.join(METRICS)} "
                f"and PERIOD one of {', '.join(PERIODS)}"
            )
        try:
            value = float(cap)
        except ValueError:
            raise ValueError(f"{item!r}: the cap must be a number") from None
        if value < 0:
            raise ValueError(f"{item!r}: the cap must not be negative")
        quotas[f"{metric}:{period}"] = value
    return quotas


def check_quota_dict(quotas: dict[str, Any]) -> dict[str, float]:
    """A key's quotas from JSON, validated like S2I_QUOTA_DEFAULT."""
    return parse_quotas(",".join(f"{k}={v}" for k, v in quotas.items()))


def period_window(period: str, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The UTC day or month holding ``now``: (start, end)."""
    day = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + dt.timedelta(days=1)
    start = day.replace(day=1)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start, end


class QuotaExceeded(Exception):
    """A request would pass a cap: which, how much is used, the cap and when it resets."""

    def __init__(self, quota: str, used: float, requested: float, cap: float, resets: dt.datetime):
        super().__init__(quota)
        self.quota, self.used, self.requested, self.cap, self.resets = (
            quota,
            used,
            requested,
            cap,
            resets,
        )


class MemoryCounter:
    """Reservations counted in this process (the embedded mode)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}

    def reserve(self, key: str, amount: float, cap: float, seed: Callable[[], float], ttl: int):
        """Add ``amount`` unless the total would pass ``cap``; returns (ok, total before)."""
        with self._lock:
            if key not in self._values:
                self._values[key] = seed()
            before = self._values[key]
            if before + amount > cap:
                return False, before
            self._values[key] = before + amount
            return True, before

    def release(self, key: str, amount: float) -> None:
        """Give ``amount`` back (a refused request's partial reservations)."""
        with self._lock:
            if key in self._values:
                self._values[key] -= amount


class RedisCounter:
    """Reservations counted in Redis, shared by every API process (the distributed mode)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def reserve(self, key: str, amount: float, cap: float, seed: Callable[[], float], ttl: int):
        """Atomic add; refused (and taken back) when it passes ``cap``."""
        name = f"{self.prefix}:quota:{key}"
        if not self.client.exists(name):
            self.client.set(name, seed(), nx=True, ex=ttl)
        total = float(self.client.incrbyfloat(name, amount))
        if total > cap:
            self.client.incrbyfloat(name, -amount)
            return False, total - amount
        return True, total - amount

    def release(self, key: str, amount: float) -> None:
        """Give ``amount`` back."""
        self.client.incrbyfloat(f"{self.prefix}:quota:{key}", -amount)


class Quotas:
    """Checks and reserves a request's estimated use against its key's caps."""

    def __init__(
        self,
        default: dict[str, float],
        counter: Any,
        used: Callable[[str, dt.datetime, dt.datetime], dict[str, float]],
    ) -> None:
        self.default = default
        self.counter = counter
        self.used = used  # usage-row totals of (owner, since, until)

    def reserve(
        self,
        owner: str,
        caps: dict[str, float] | None,
        estimate: dict[str, float],
        now: dt.datetime,
    ) -> None:
        """Reserve ``estimate`` under every cap; QuotaExceeded (nothing reserved) if one fails."""
        caps = {**self.default, **(caps or {})}
        taken: list[tuple[str, float]] = []
        try:
            for quota, cap in sorted(caps.items()):
                metric, period = quota.split(":")
                start, end = period_window(period, now)
                amount = float(estimate.get(metric, 0.0))
                key = f"{owner}:{quota}:{start:%Y%m%d}"
                ttl = int((end - now).total_seconds()) + 3600

                def seed(start: dt.datetime = start, end: dt.datetime = end, m: str = metric):
                    return float(self.used(owner, start, end).get(m, 0.0))

                if metric == "audio_seconds":
                    # Known only once decoded: the usage rows say what was used; a key at
                    # its cap is refused, the request that passes it is not cut short.
                    before = seed()
                    if before >= cap or before + amount > cap:
                        raise QuotaExceeded(quota, before, amount, cap, end)
                    continue
                ok, before = self.counter.reserve(key, amount, cap, seed, ttl)
                if not ok:
                    raise QuotaExceeded(quota, before, amount, cap, end)
                taken.append((key, amount))
        except QuotaExceeded:
            for key, amount in taken:
                self.counter.release(key, amount)
            raise
