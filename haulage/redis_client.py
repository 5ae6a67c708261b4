"""One Redis client per process, created lazily (never at import time), for a plain Redis or a Sentinel group.

redis-py pools notice a fork and reconnect, but creating the client lazily
also keeps a module import from opening sockets in the parent of a prefork pool.
Besides haulage.devtools, only the two seams use it (the Redis store in haulage.progress and
haulage.coordination), so the layers above them never meet raw Redis.

With a ``sentinel://`` URL (see :func:`haulage.settings.parse_sentinel_url`) the
client asks the sentinels for the master of HAULAGE_REDIS_SENTINEL_MASTER and
follows it across a failover: a connection to a master that went away, or that
answers READONLY because it was demoted, is dropped and the command retried
(redis-py's retry: 10 tries, backoff from 10 ms up to 1 s, about 4 s in all) on
whatever master the sentinels name then. Lua scripts are sent again by
EVALSHA's NOSCRIPT fallback on the new master; pub/sub resubscribes when it
reconnects. A master that answers NOREPLICAS (``min-replicas-to-write``: it lost
its replica, most likely because the replica was just promoted) is left the same
way (:class:`FollowingConnection`), and so are kombu's and the result backend's
connections (haulage.tasks.sentinel_transport, haulage.tasks.result_backend).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import EqualJitterBackoff  # in every redis-py this project allows (5.2 has no ExponentialWithJitter)
from redis.retry import Retry

from haulage.settings import get_settings, is_sentinel, parse_sentinel_url


class FollowingConnection(redis.sentinel.SentinelManagedConnection):
    """A connection to the Sentinel group's master that follows it to wherever the sentinels say it is.

    redis-py drops a connection whose master answers READONLY (demoted), but its
    reconnect goes back to the same address; this one asks the sentinels on every
    connect. A master running with ``min-replicas-to-write`` answers NOREPLICAS from
    the moment its replica is promoted until it is demoted: that is the same news and
    gets the same answer, so the command is retried on the new master instead of failing.
    """

    def _connect(self) -> Any:
        # Every new socket goes to the master the sentinels name now. redis-py reconnects a dropped
        # connection (and retries a refused connect) to the address it last had: after a failover,
        # the demoted master, until the retries run out (redis-py issues 3874 and 3560).
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if self.connection_pool.is_master and str(exc).startswith("NOREPLICAS"):
                self.disconnect()
                raise redis.ConnectionError(f"the master has no replica to write to: {exc}") from exc
            raise


#: seconds: the engine's client waits this long for one reply, and for one connection
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
#: seconds a sentinel has to answer "who is the master?" before the next one is asked
SENTINEL_TIMEOUT = 1.0
#: tries after a lost connection: what redis-py gives a client made from a URL, which a client made
#: through Sentinel (on a pool of its own) does not get. About 4 s in all: a promoted replica
#: answers well within that after ``SENTINEL FAILOVER`` (0.4 s measured).
RETRIES = 10
#: what those tries are for, named: redis-py before 6 retries nothing it is not told to, whatever ``retry`` says
RETRY_ON = [redis.ConnectionError, redis.TimeoutError]


def retry_policy() -> Retry:
    """redis-py's default retries on a lost connection, for pools made through Sentinel."""
    return Retry(EqualJitterBackoff(cap=1.0, base=0.01), RETRIES)


def connect(url: str, **options: Any) -> redis.Redis:
    """A client for ``url``: ``redis://`` and friends as redis-py reads them, ``sentinel://`` through Sentinel.

    ``options`` are redis-py connection options (timeouts, health checks), used for the master's connections.
    """
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    address = parse_sentinel_url(url)
    sentinel = redis.sentinel.Sentinel(list(address.sentinels), sentinel_kwargs=_sentinel_kwargs(options))
    master: redis.Redis = sentinel.master_for(get_settings().redis_sentinel_master, db=address.db,
                                              username=address.username, password=address.password,
                                              **{"retry": retry_policy(), "retry_on_error": RETRY_ON,
                                                 "connection_class": FollowingConnection, **options})  # fmt: skip
    return master


def connect_async(url: str, **options: Any) -> redis.asyncio.Redis:
    """The asyncio twin of :func:`connect` (the HTTP service's live streams)."""
    if not is_sentinel(url):
        return redis.asyncio.Redis.from_url(url, **options)
    address = parse_sentinel_url(url)
    sentinel = redis.asyncio.sentinel.Sentinel(list(address.sentinels), sentinel_kwargs=_sentinel_kwargs(options))
    master: redis.asyncio.Redis = sentinel.master_for(
        get_settings().redis_sentinel_master,
        db=address.db,
        username=address.username,
        password=address.password,
        **{"retry": redis.asyncio.retry.Retry(EqualJitterBackoff(cap=1.0, base=0.01), RETRIES),
           "retry_on_error": RETRY_ON, **options},
    )
    return master


def _sentinel_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    # A sentinel that does not answer quickly is skipped for the next: never wait the master's long timeout on one.
    timeout = min(float(options.get("socket_timeout") or SENTINEL_TIMEOUT), SENTINEL_TIMEOUT)
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout}


@functools.cache
def get_redis() -> redis.Redis:
    return connect(
        get_settings().redis_url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=30,
    )


def reset_redis() -> None:
    get_redis.cache_clear()


def _fresh_pool_locks() -> None:
    """In a forked child, give the process's pools new locks before anything uses them.

    A prefork worker forks a new pool process whenever one dies, while threads of
    its main process (the orphan sweep, the settings announcer) use this client.
    redis-py 8 takes the pool's lock when a child first resets the pool it inherited;
    a lock such a thread held at the fork is held forever in the child, which then
    hangs in its first Redis call (seen: pool processes stuck for minutes after
    SIGKILLed siblings were replaced). Only the forking thread exists in the child,
    so new locks are safe.
    """
    if not get_redis.cache_info().currsize:
        return
    client = get_redis()
    pools = [client.connection_pool]
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    pools += [s.connection_pool for s in getattr(manager, "sentinels", ())]
    for pool in pools:
        pool._fork_lock = threading.RLock()  # noqa: SLF001 - the fix is to these private locks
        pool._lock = threading.RLock()  # noqa: SLF001


os.register_at_fork(after_in_child=_fresh_pool_locks)
