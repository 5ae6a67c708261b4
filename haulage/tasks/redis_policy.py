"""A worker's look at its Redis before it takes work: eviction and persistence.

Locks, checkpoints, guards and the queues all live in Redis. An eviction
policy other than ``noeviction`` lets Redis drop a lock or a checkpoint under
memory pressure (``volatile-*`` evicts exactly the keys with a TTL, the
locks), which breaks the guarantees in the README; a Redis without
persistence loses every queued message and checkpoint when it restarts.
HAULAGE_REDIS_CHECK says what a worker does: ``refuse`` (default) stops on an
evicting Redis and warns on one without persistence, ``warn`` only warns,
``off`` does not look.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis

from haulage.errors import ConfigError
from haulage.redis_client import connect
from haulage.settings import get_settings

log = logging.getLogger("haulage.redis_check")


def problems(url: str) -> tuple[list[str], list[str]]:
    """(what breaks the guarantees, what weakens them) on the Redis at ``url``; empty when it cannot tell."""
    client = connect(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        config = {**client.config_get("maxmemory-policy"), **client.config_get("appendonly"),
                  **client.config_get("save"), **client.config_get("min-replicas-to-write")}  # fmt: skip
    except redis.ResponseError as exc:  # managed Redis often disables CONFIG: say so, do not guess
        log.warning("cannot read the configuration of Redis at %s (%s): make sure maxmemory-policy is "
                    "noeviction and persistence is on", _shown(url), exc)  # fmt: skip
        return [], []
    except redis.RedisError:  # unreachable: the worker's own connection retries and says so
        return [], []
    finally:
        client.close()
    fatal, weak = [], []
    policy = str(config.get("maxmemory-policy", "noeviction"))
    if policy != "noeviction":
        fatal.append(f"maxmemory-policy is {policy}: Redis may evict a step lock, checkpoint or queued message; "
                     "set maxmemory-policy noeviction")  # fmt: skip
    if str(config.get("appendonly", "no")) != "yes":
        where = "only RDB snapshots" if str(config.get("save", "")).strip() else "no persistence"
        weak.append(f"appendonly is off ({where}): a Redis restart loses queued messages and checkpoints "
                    "written since the last save; set appendonly yes, appendfsync everysec")  # fmt: skip
    if url.startswith("sentinel://") and str(config.get("min-replicas-to-write", "0")) == "0":
        # Without it, a master whose replica was promoted goes on taking writes from clients still
        # connected to it until the sentinels demote it (up to 10 s), and its resync throws them away.
        weak.append("min-replicas-to-write is 0 on the Sentinel group's master: a failover may lose "
                    "acknowledged writes and run steps and guarded effects again; "
                    "set min-replicas-to-write 1 on every node")  # fmt: skip
    return fatal, weak


def check_redis(urls: Iterable[str] | None = None, *, mode: str | None = None) -> None:
    """Log a warning for each weakness; raise ConfigError on an evicting Redis when the mode is ``refuse``."""
    mode = mode or get_settings().redis_check
    if mode == "off":
        return
    s = get_settings()
    wanted = dict.fromkeys(urls if urls is not None else (s.redis_url, s.broker_url))
    for url in wanted:
        if not url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            continue
        fatal, weak = problems(url)
        for message in weak:
            log.warning("Redis at %s: %s", _shown(url), message)
        if fatal and mode == "refuse":
            raise ConfigError(f"Redis at {_shown(url)}: {fatal[0]} (HAULAGE_REDIS_CHECK=warn starts anyway)")
        for message in fatal:
            log.warning("Redis at %s: %s", _shown(url), message)


def _shown(url: str) -> str:
    # Never print a password that may be in the URL.
    return ";".join(_shown_one(part) for part in url.split(";"))  # a Sentinel group has several parts


def _shown_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url
