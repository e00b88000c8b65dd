"""What the distributed mode keeps in Redis: only what can be rebuilt from the job rows.

Keys, all under ``S2I_QUEUE_PREFIX``: ``events`` (pub/sub of job changes), ``active`` and
``active:<owner>`` (admission: sorted sets of job ids scored by admission time, rebuilt from
rows by the reconciler), ``worker:<name>`` (heartbeats), ``epoch`` (a marker whose absence
says Redis lost its data). Celery's own keys (queues, ``unacked``) share the prefix. Every
call is bounded by the client's socket timeouts: a frozen Redis answers an error, quickly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import redis

__all__ = ["REDIS_ERRORS", "BrokerState", "redis_client"]

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.RedisError, OSError)
WORKER_TTL = 6  # a worker silent this long is gone (it beats every 2 s)

# Admit a job unless its owner or everyone is at the limit: 0 admitted, 1 owner full, 2 full.
_ADMIT = """
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 2 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 0
"""


def redis_client(url: str, timeout: float) -> redis.Redis:
    """A client of the broker's Redis whose every call fails within ``timeout`` seconds."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
        retry_on_timeout=False,
        decode_responses=False,
    )


class BrokerState:
    """Admission counters, job events, worker heartbeats and broker inspection in Redis."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self.events = f"{prefix}:events"
        self._admit = client.register_script(_ADMIT)

    def key(self, kind: str, *parts: str) -> str:
        """A Redis key under the prefix."""
        return ":".join((self.prefix, kind, *parts))

    def ping(self) -> None:
        """Raise when Redis does not answer."""
        self.redis.ping()

    # --- admission ---------------------------------------------------------------------------
    def admit(self, job_id: str, owner: str, max_queued: int, max_per_owner: int) -> int:
        """Count a job against the limits: 0 admitted, 1 owner full, 2 everything full."""
        return int(
            self._admit(
                keys=[self.key("active"), self.key("active", owner)],
                args=[job_id, max_queued, max_per_owner, time.time()],
            )
        )

    def release(self, job_id: str, owner: str) -> None:
        """The job no longer counts against the limits."""
        self.redis.pipeline().zrem(self.key("active"), job_id).zrem(
            self.key("active", owner), job_id
        ).execute()

    def rebuild_admission(self, active: dict[str, str], grace: float) -> int:
        """Make the counters say what the rows say: ``active`` maps job id -> owner.

        Jobs missing from the counters are added; counted jobs with no unfinished row are
        removed once older than ``grace`` (a submission may be between its admission and its
        row). Returns how many entries changed.
        """
        now = time.time()
        changed = 0
        by_owner: dict[str, set[str]] = {}
        for job_id, owner in active.items():
            by_owner.setdefault(owner, set()).add(job_id)
        keys = {self.key("active"): set(active)}
        for key in self.redis.scan_iter(match=self.key("active", "*"), count=200):
            name = key.decode() if isinstance(key, bytes) else key
            keys.setdefault(name, set())
        for owner, ids in by_owner.items():
            keys[self.key("active", owner)] = ids
        for key, wanted in keys.items():
            counted = {
                (m.decode() if isinstance(m, bytes) else m): score
                for m, score in self.redis.zrange(key, 0, -1, withscores=True)
            }
            missing = {job_id: now for job_id in wanted if job_id not in counted}
            stale = [m for m, score in counted.items() if m not in wanted and score < now - grace]
            pipe = self.redis.pipeline()
            if missing:
                pipe.zadd(key, missing)
            if stale:
                pipe.zrem(key, *stale)
            pipe.execute()
            changed += len(missing) + len(stale)
        return changed

    # --- events ------------------------------------------------------------------------------
    def publish(self, event: dict[str, Any]) -> None:
        """Tell every API process about a change of a job."""
        self.redis.publish(self.events, json.dumps(event))

    # --- workers -----------------------------------------------------------------------------
    def heartbeat(self, name: str, description: dict[str, Any]) -> None:
        """Announce a live worker for a while."""
        self.redis.set(self.key("worker", name), json.dumps(description), ex=WORKER_TTL)

    def forget_worker(self, name: str) -> None:
        """A worker stopped."""
        self.redis.delete(self.key("worker", name))

    def workers(self) -> list[dict[str, Any]]:
        """Live workers (from their heartbeats), by name."""
        workers = []
        for key in self.redis.scan_iter(match=self.key("worker", "*"), count=100):
            raw = self.redis.get(key)
            if raw:
                workers.append(json.loads(raw))
        workers.sort(key=lambda w: w["name"])
        return workers

    # --- the broker's own keys ---------------------------------------------------------------
    def queue_key(self, queue: str) -> str:
        """The Redis list of a Celery queue (kombu's global key prefix included)."""
        return f"{self.prefix}:{queue}"

    def queue_depths(self, queues: Iterable[str]) -> dict[str, int]:
        """Tasks waiting in each queue."""
        names = sorted(set(queues))
        pipe = self.redis.pipeline()
        for queue in names:
            pipe.llen(self.queue_key(queue))
        return {queue: int(n) for queue, n in zip(names, pipe.execute(), strict=True)}

    def queued_task_ids(self, queues: Iterable[str]) -> set[str]:
        """Ids of the tasks waiting in ``queues`` (a job's task id is its job id)."""
        ids: set[str] = set()
        for queue in set(queues):
            for raw in self.redis.lrange(self.queue_key(queue), 0, -1):
                try:
                    ids.add(json.loads(raw)["headers"]["id"])
                except (ValueError, KeyError, TypeError):
                    continue
        return ids

    def touch_unacked(self, delivery_tag: str) -> None:
        """Keep a delivered task invisible to kombu's restore of a dead consumer's tasks."""
        self.redis.zadd(f"{self.prefix}:unacked_index", {delivery_tag: time.time()}, xx=True)

    def identity(self) -> tuple[str, bool]:
        """Who this Redis is: its run id, and whether our marker was missing (set again now).

        The run id changes when Redis restarted; the marker goes missing when it lost its
        data (a restart without persistence, a flush, a failover to an empty replica).
        """
        run_id = str(self.redis.info("server").get("run_id", ""))
        missing = bool(self.redis.set(self.key("epoch"), b"1", nx=True))
        return run_id, missing
