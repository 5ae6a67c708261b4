"""A pool process forked while another thread holds the Redis client's pool lock must not hang.

A prefork worker forks a replacement whenever a pool process dies, while its
main process's threads (the orphan sweep, the settings announcer) use the same
client. redis-py 8 takes the pool's lock when the child first resets the pool
it inherited; held by another thread at the fork, that lock never opens there.
The chaos scenario that SIGKILLs pool processes found children stuck for minutes.
"""

from __future__ import annotations

import os
import signal
import threading

import redis

#: seconds a forked child gets for one PING before SIGALRM ends it
CHILD_LIMIT = 5


def _ping_in_a_child_forked_while_the_pool_lock_is_held(client: redis.Redis) -> int:
    client.ping()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with client.connection_pool._lock:  # what a thread mid-command holds for a moment
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: one command, or SIGALRM's default action ends it
        signal.alarm(CHILD_LIMIT)
        code = 1
        try:
            client.ping()
            code = 0
        finally:
            os._exit(code)
    release.set()
    thread.join()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_haulage_client_works_in_a_child_forked_while_its_pool_lock_was_held(redis_server: str) -> None:
    from haulage.redis_client import get_redis

    assert _ping_in_a_child_forked_while_the_pool_lock_is_held(get_redis()) == 0
