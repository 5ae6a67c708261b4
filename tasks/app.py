"""The Celery application, configured from celeryconfig.py."""

from __future__ import annotations

from celery import Celery

from haulage.logs import connect_celery

app = Celery("haulage")
app.config_from_object("celeryconfig")
connect_celery()  # worker and beat log lines carry run id, step key, attempt and backend
