"""Celery's Redis result backend, writing results with ``SET ... EX`` instead of ``SETEX``.

redis-py 8 deprecates ``setex``, which Celery's backend calls for every
result: a worker thread under ``pytest -W error`` then fails to store the
result of a fan-out's step and its chord never fires (the run hangs). Same
keys, same expiry, same pub/sub notice; only the command differs. Selected
for ``redis://`` and ``rediss://`` URLs by ``override_backends`` in
:mod:`haulage.tasks.config`, and for ``sentinel://`` ones as :class:`SentinelBackend`
(Celery's Sentinel backend, which follows the master across a failover, with the same changes).
"""

from __future__ import annotations

from typing import Any

from celery._state import get_current_task
from celery.backends.redis import RedisBackend as _CeleryRedisBackend
from celery.backends.redis import SentinelBackend as _CelerySentinelBackend

from haulage.redis_client import FollowingConnection


class _Changes(_CeleryRedisBackend):
    def on_task_call(self, producer: Any, task_id: str) -> None:
        # A task never waits for a result (no .get() inside a task), so a message sent from one
        # (a fan-out's chord, a retry) needs no subscription. Celery skips it in prefork children;
        # in a threads-pool worker (haulage.testing) it would subscribe, and retry for 20 s when
        # Redis stops at the end of a test session.
        if get_current_task() is not None:
            return
        super().on_task_call(producer, task_id)

    def add_pending_result(self, result: Any, weak: bool = False, start_drainer: bool = True) -> Any:
        # The same inside a task: a group sent there (a fan-out) registers its results with a
        # barrier no one inside the task will wait on.
        if get_current_task() is not None:
            return result
        return super().add_pending_result(result, weak=weak, start_drainer=start_drainer)

    def _set(self, key: Any, value: Any, expires: Any = None) -> None:
        if expires is None:
            expires = self.expires
        with self.client.pipeline() as pipe:
            pipe.set(key, value, ex=expires or None)
            pipe.publish(key, value)
            pipe.execute()


class RedisBackend(_Changes):
    """Celery's Redis result backend with Haulage's changes."""


class SentinelBackend(_Changes, _CelerySentinelBackend):
    """Celery's Sentinel result backend (``sentinel://`` URLs) with Haulage's changes.

    Its connections are :class:`~haulage.redis_client.FollowingConnection`: a master that
    answers NOREPLICAS (its replica was promoted) is left for the new one, as READONLY is.
    """

    def _get_pool(self, **params: Any) -> Any:
        sentinel = self._get_sentinel_instance(**params)
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        options = {} if "connection_class" in sentinel.connection_kwargs else {"connection_class": FollowingConnection}
        master = sentinel.master_for(service_name=self._transport_options.get("master_name"),
                                     redis_class=self._get_client(), **credentials, **options)  # fmt: skip
        return master.connection_pool
