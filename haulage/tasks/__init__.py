"""The Celery side of Haulage: the app, the ``@step`` decorator and the durable wrapper.

>>> from haulage.tasks import step, StepContext
>>> @step(runtime="short", retries=3)
... def analyze_page(ctx: StepContext, project_id: str, page: int) -> dict:
...     return {"page": page}
"""

from __future__ import annotations

from haulage.tasks.app import app
from haulage.tasks.context import StepContext
from haulage.tasks.definition import Step, StepCall
from haulage.tasks.results import Failure, Results
from haulage.tasks.step import all_steps, get_step, step

__all__ = [
    "step",
    "StepContext",
    "Results",
    "Failure",
    # advanced
    "Step",
    "StepCall",
    "get_step",
    "all_steps",
    "app",
]
