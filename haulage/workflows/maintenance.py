"""Haulage's own periodic jobs: the beat entries of the reaper and retention.

Each maintenance module adds its entry here when it is defined;
:func:`haulage.workflows.schedules.beat_schedule` imports those modules and
hands every entry to beat beside the scheduled workflows.
"""

from __future__ import annotations

from typing import Any

#: beat entry name -> Celery beat entry ({"task", "schedule", "options"})
MAINTENANCE: dict[str, dict[str, Any]] = {}
