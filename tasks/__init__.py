"""This deployment's Celery entry point: ``celery -A tasks inspect active``, ``celery -A tasks worker``.

It is Haulage's own app (``haulage.tasks.app``), configured by the installed
package, this repository's ``celeryconfig.py`` when HAULAGE_CELERYCONFIG names
it, and HAULAGE_* variables. ``haulage worker`` and ``haulage beat`` start the
same app with Haulage's defaults for queues and concurrency.
"""

from __future__ import annotations

from haulage.tasks.app import app

__all__ = ["app"]
