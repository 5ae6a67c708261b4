"""This deployment's Celery settings, applied over Haulage's own defaults.

Not installed with Haulage and never loaded by accident: a process reads this
file only when HAULAGE_CELERYCONFIG=celeryconfig (docker-compose.yml and the
Dockerfile set it). Any public lowercase name here is a Celery setting.
Haulage refuses to start when one of them would break a durability guarantee
(JSON only, acks_late, reject_on_worker_lost, prefetch 1, the visibility
timeout above the longest retry countdown, RedBeat for beat), naming the setting.
See haulage/tasks/config.py for the defaults and the README's configuration table.
"""

# Recycle a worker process after this many steps: bounds the memory a leaky
# step library can pile up, at the cost of a fork every 1,000 steps.
worker_max_tasks_per_child = 1000

# Celery's time zone for beat's crontab entries (schedules are UTC by default).
timezone = "UTC"
