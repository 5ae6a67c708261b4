"""Haulage's own Celery settings: the defaults every worker, beat and client starts from.

The HAULAGE_* variables in the README configure the common ones. A deployment
adds or changes others in its own settings module, named by
HAULAGE_CELERYCONFIG (the repository's ``celeryconfig.py``), or one at a time
as HAULAGE_CELERY_<NAME>; :mod:`haulage.tasks.app` applies both over these and
refuses a value that would break a durability guarantee.
"""

from __future__ import annotations

from kombu import Exchange, Queue

from haulage.settings import get_settings
from haulage.tasks.queues import QUEUES

_s = get_settings()

broker_url = _s.broker_url
result_backend = _s.result_backend

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

# Redis redelivers an unacknowledged message after the visibility timeout;
# retry countdowns are held unacked, so every countdown stays below it
# (HAULAGE_MAX_COUNTDOWN is validated against it).
broker_transport_options = {"visibility_timeout": int(_s.visibility_timeout)}
result_backend_transport_options = {
    "visibility_timeout": int(_s.visibility_timeout),
    "result_chord_ordered": True,
}
result_expires = 24 * 3600

# Operators follow tasks in Flower. No "task-sent" events: they carry the real task name,
# and arriving late they would overwrite the readable "workflow.step" (shadow) name.
worker_send_task_events = True
task_send_sent_event = False
task_track_started = True

imports = (
    "haulage.workflows.fanout",
    "haulage.workflows.finish",
    "haulage.dispatch.driver",
    "haulage.workflows.schedules",
    "haulage.workflows.reaper",
    "haulage.workflows.completion",
    "haulage.workflows.retention",
    *_s.modules,
)

# Beat keeps its schedule in Redis, behind a lock: two beat processes never fire the same entry.
beat_scheduler = "redbeat.RedBeatScheduler"
redbeat_redis_url = _s.redis_url
redbeat_key_prefix = f"{_s.key_prefix}:redbeat"
redbeat_lock_timeout = 30  # seconds a dead beat's lock blocks a standby one
beat_max_loop_interval = 5
