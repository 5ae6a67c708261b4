"""The Celery application, configured from celeryconfig.py."""

from __future__ import annotations

from celery import Celery

app = Celery("haulage")
app.config_from_object("celeryconfig")
