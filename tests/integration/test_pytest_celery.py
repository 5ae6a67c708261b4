"""Testing your own workflows with pytest-celery's fixtures: an in-process worker on Haulage's app.

pytest-celery re-exports Celery's fixtures (``celery_session_app``,
``celery_session_worker``...). Overriding the app fixture with Haulage's app
and choosing the queues gives a real Celery worker in a thread of the test
process, for fast tests of step logic with the engine around it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pytest

from haulage.workflows import RunStatus, registry

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="session")
def celery_session_app(redis_server: str) -> Any:
    from haulage.tasks.app import app

    return app


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    return "threads"


@pytest.fixture(scope="session")
def celery_worker_parameters() -> Mapping[str, Any]:
    # Only the queue of the step under test: the engine's own tasks go to the session worker.
    return {"queues": ("inproc",), "perform_ping_check": False, "concurrency": 2}


def test_a_step_runs_in_the_in_process_worker(worker: Any, celery_session_worker: Any) -> None:
    run = registry.get("t_inproc").start(x=3)
    assert run.wait(timeout=30).status is RunStatus.COMPLETE
    assert run.results() == {"x": 3, "pid": os.getpid()}  # it ran here, in the test process
