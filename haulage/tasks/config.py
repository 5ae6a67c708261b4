"""Haulage's own Celery settings: the defaults every worker, beat and client starts from.

The HAULAGE_* variables in the README configure the common ones. A deployment
adds or changes others in its own settings module, named by
HAULAGE_CELERYCONFIG (the repository's ``celeryconfig.py``), or one at a time
as HAULAGE_CELERY_<NAME>; :mod:`haulage.tasks.app` applies both over these and
refuses a value that would break a durability guarantee.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from haulage.settings import Settings, get_settings, is_sentinel, parse_sentinel_url
from haulage.tasks.queues import QUEUES, broker_prefix, route_task
from haulage.tasks.sentinel_transport import TRANSPORT


def from_settings(s: Settings) -> dict[str, Any]:
    """The Celery settings that come from HAULAGE_* variables (re-applied by haulage.testing when they change)."""
    prefix = broker_prefix(s.key_prefix)
    conf: dict[str, Any] = {
        "broker_url": s.broker_url,
        "result_backend": s.result_backend,
        # Redis redelivers an unacknowledged message after the visibility timeout;
        # retry countdowns are held unacked, so every countdown stays below it
        # (HAULAGE_MAX_COUNTDOWN is validated against it).
        # Every key kombu writes (the queues, ``unacked``, ``unacked_index``, ``_kombu.binding.*``,
        # the event and control channels) and every result key starts with HAULAGE_KEY_PREFIX, so two
        # Haulage apps, or Haulage and another Celery app, share one Redis without taking each other's
        # messages. The unacked key names are spelled out for readers of the broker's keys (the orphan
        # sweep): the key in Redis is ``global_keyprefix`` + the name (see queues.broker_key).
        "broker_transport_options": {
            "visibility_timeout": int(s.visibility_timeout),
            "global_keyprefix": prefix,
            "unacked_key": "unacked",
            "unacked_index_key": "unacked_index",
        },
        "result_backend_transport_options": {
            "visibility_timeout": int(s.visibility_timeout),
            "result_chord_ordered": True,
            "global_keyprefix": prefix,
        },
        "imports": (*_ENGINE_MODULES, *s.modules),
        "redbeat_redis_url": s.redis_url,
        "redbeat_key_prefix": f"{s.key_prefix}:redbeat",
    }
    # A Sentinel group (sentinel://...;sentinel://...): kombu, Celery's result backend and RedBeat each
    # ask the sentinels for the master of HAULAGE_REDIS_SENTINEL_MASTER and follow it across a failover.
    conf["broker_transport"] = None  # kombu picks the transport from the URL's scheme
    if is_sentinel(s.broker_url):
        conf["broker_transport"] = TRANSPORT
        conf["broker_transport_options"]["master_name"] = s.redis_sentinel_master
    if is_sentinel(s.result_backend):
        conf["result_backend_transport_options"]["master_name"] = s.redis_sentinel_master
    if is_sentinel(s.redis_url):
        address = parse_sentinel_url(s.redis_url)
        conf["redbeat_redis_url"] = "redis-sentinel://"  # RedBeat's scheme; the sentinels come in the options
        conf["redbeat_redis_options"] = {"sentinels": [list(a) for a in address.sentinels],
                                         "service_name": s.redis_sentinel_master, "db": address.db,
                                         "password": address.password, "socket_timeout": 10}  # fmt: skip
        if address.username:
            conf["redbeat_redis_options"]["username"] = address.username
    return conf


_ENGINE_MODULES = (
    "haulage.workflows.fanout",
    "haulage.workflows.finish",
    "haulage.dispatch.driver",
    "haulage.workflows.schedules",
    "haulage.workflows.reaper",
    "haulage.workflows.completion",
    "haulage.workflows.retention",
)

_from_env = from_settings(get_settings())
broker_url = _from_env["broker_url"]
broker_transport = _from_env["broker_transport"]
result_backend = _from_env["result_backend"]

# JSON only: pickle on the wire is arbitrary code execution.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"

# A message is acknowledged only after its step finished, and a worker that dies
# mid-step gives its message back; the step lock and checkpoint make the
# redelivery harmless.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
broker_connection_retry_on_startup = True

task_queues = tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES)
task_default_queue = "short"
task_default_exchange = "short"
task_default_routing_key = "short"
task_routes = (route_task,)  # each step's queue (Celery 6 drops the per-task ``queue`` attribute)

broker_transport_options = _from_env["broker_transport_options"]
result_backend_transport_options = _from_env["result_backend_transport_options"]
result_expires = 24 * 3600
# Results are written with SET EX, not the SETEX redis-py 8 deprecates (see tasks/result_backend.py).
override_backends = {"redis": "haulage.tasks.result_backend:RedisBackend",
                     "rediss": "haulage.tasks.result_backend:RedisBackend",
                     "sentinel": "haulage.tasks.result_backend:SentinelBackend"}  # fmt: skip

# Operators follow tasks in Flower. No "task-sent" events: they carry the real task name,
# and arriving late they would overwrite the readable "workflow.step" (shadow) name.
worker_send_task_events = True
task_send_sent_event = False
task_track_started = True

imports = _from_env["imports"]

# Beat keeps its schedule in Redis, behind a lock: two beat processes never fire the same entry.
beat_scheduler = "redbeat.RedBeatScheduler"
redbeat_redis_url = _from_env["redbeat_redis_url"]
if "redbeat_redis_options" in _from_env:
    redbeat_redis_options = _from_env["redbeat_redis_options"]
redbeat_key_prefix = _from_env["redbeat_key_prefix"]
redbeat_lock_timeout = 30  # seconds a dead beat's lock blocks a standby one
beat_max_loop_interval = 5
