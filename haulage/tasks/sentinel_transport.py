"""kombu's Redis Sentinel transport, on connections that follow the master across a failover.

Selected by :mod:`haulage.tasks.config` (``broker_transport``) when the broker URL is
``sentinel://``. kombu's own Sentinel channel already asks the sentinels for the
master and reconnects when a connection breaks or the master answers READONLY;
its connections are redis-py's, which do not know NOREPLICAS, the answer of a
master with ``min-replicas-to-write`` whose replica has just been promoted. On
:class:`haulage.redis_client.FollowingConnection` that answer drops the connection
too, so a worker's publish or BRPOP goes to the new master instead of failing.
"""

from __future__ import annotations

from typing import Any

from kombu.transport.redis import SentinelChannel, SentinelTransport

from haulage.redis_client import FollowingConnection, retry_policy


class Channel(SentinelChannel):
    connection_class = FollowingConnection

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # A pool made through Sentinel gives its connections no retries (one made from a URL has
        # redis-py's ten): an ack or a publish during the switch would fail instead of reaching the
        # new master. A repeated publish is a duplicate delivery, which the step lock and checkpoint absorb.
        # Not the event loop's connections (BRPOP, the broadcast subscription): a retry there reconnects
        # and then waits on a blocking read of the new socket, freezing the worker's loop; kombu
        # reconnects those itself when the error reaches it.
        params: dict[str, Any] = super()._connparams(asynchronous)
        if not asynchronous:
            params.setdefault("retry", retry_policy())
        return params


class Transport(SentinelTransport):
    Channel = Channel


#: the value of Celery's ``broker_transport`` for a ``sentinel://`` broker URL
TRANSPORT = "haulage.tasks.sentinel_transport:Transport"
