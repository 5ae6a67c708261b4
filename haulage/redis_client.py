"""One Redis client per process, created lazily (never at import time).

redis-py pools notice a fork and reconnect, but creating the client lazily
also keeps a module import from opening sockets in the parent of a prefork pool.
Besides haulage.devtools, only the two seams use it (the Redis store in haulage.progress and
haulage.coordination), so the layers above them never meet raw Redis.
"""

from __future__ import annotations

import functools

import redis

from haulage.settings import get_settings


@functools.cache
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().redis_url,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


def reset_redis() -> None:
    get_redis.cache_clear()
