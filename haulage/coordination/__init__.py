"""Coordination: locks, liveness, stage counters, ledgers, the Cloud Run hand-off and completion events.

Everything the engine's processes share besides the progress documents of
:mod:`haulage.progress`; always on Redis, whichever store holds the documents.

>>> coordination = get_coordination()
>>> coordination.count_stage(run_id, stage=2)
3
"""

from __future__ import annotations

import functools

import redis

from haulage.coordination.redis_coordination import RedisCoordination
from haulage.coordination.seam import CompletionFeed, Coordination, FanInEntry, Handoff, LockGrant, LockRelease
from haulage.redis_client import get_redis


def get_coordination() -> Coordination:
    """The coordination backend: Redis at HAULAGE_REDIS_URL, on the process's shared client."""
    return _on(get_redis())


# Keyed on the client, so a reset_redis() (e.g. a new HAULAGE_REDIS_URL) moves coordination to the new one.
@functools.lru_cache(maxsize=1)
def _on(client: redis.Redis) -> RedisCoordination:
    return RedisCoordination(client)


__all__ = [
    "Coordination",
    "get_coordination",
    "RedisCoordination",
    # records
    "CompletionFeed",
    "Handoff",
    "LockGrant",
    "LockRelease",
    "FanInEntry",
]
