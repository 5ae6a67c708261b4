"""A StepContext for calling a step's function directly in a unit test: no Redis, nothing durable.

It is a real :class:`haulage.StepContext` on the in-memory store, so a step
sees the same methods and the test reads back what the step reported:

>>> ctx = StepContext()
>>> analyze_page(ctx, project_id="p1", page=1, text="...")
>>> ctx.progress_reports, ctx.costs, ctx.events, ctx.effects
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from haulage.progress.memory_store import MemoryStore
from haulage.progress.models import RunRecord
from haulage.tasks.context import StepContext as _RealStepContext
from haulage.tasks.flow import Flow

T = TypeVar("T")


class StepContext(_RealStepContext):
    """``StepContext(run_id=, step_key=, attempt=)``: what a step gets, recorded for the test to read.

    - ``progress_reports``: ``[(percent, message), ...]`` in order;
    - ``costs``: ``{model: {"usd", "input_tokens", "output_tokens", "calls"}}`` totals;
    - ``events``: the messages of ``ctx.event``;
    - ``effects``: the ``once`` keys whose block completed (a block that raised is not in it);
    - ``cancel()`` makes ``ctx.cancelled`` true (and ``raise_if_cancelled`` raise), as a cancel would.
    """

    def __init__(self, *, run_id: str = "test-run", step_key: str = "0:step", step_name: str = "step",
                 attempt: int = 1, backend: str = "local") -> None:  # fmt: skip
        self.store = MemoryStore()
        self.store.create_run(RunRecord(id=run_id, workflow="test"))
        flow: Flow = {"workflow": "test", "stage": 0, "stages": 1, "item": None, "units": 1, "input": "none",
                      "on_failure": "collect", "attempt": attempt}  # fmt: skip
        super().__init__(self.store, run_id=run_id, step_key=step_key, step_name=step_name, attempt=attempt,
                         flow=flow, backend=backend)  # fmt: skip
        self.progress_reports: list[tuple[float, str]] = []
        self.events: list[str] = []
        self.effects: list[str] = []
        self._ledgers: dict[str, MemoryLedger] = {}

    def progress(self, percent: float, message: str = "") -> None:
        self.progress_reports.append((max(0.0, min(100.0, float(percent))), message))
        super().progress(percent, message)

    def event(self, message: str, kind: str = "step") -> None:
        self.events.append(message)
        super().event(message, kind)

    @property
    def costs(self) -> dict[str, dict[str, float]]:
        record = self.store.get_run(self.run_id)
        assert record is not None
        return {model: {"usd": c.usd, "input_tokens": c.input_tokens, "output_tokens": c.output_tokens,
                        "calls": c.calls} for model, c in record.cost.items()}  # fmt: skip

    def cancel(self) -> None:
        """What ``run.cancel()`` does, as the step sees it."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @contextmanager
    def _once(self, key: str) -> Iterator[bool]:
        if key in self.effects:
            yield False
            return
        yield True
        self.effects.append(key)  # not reached when the block raised: a retry performs the effect

    def once(self, key: str, *, on_unknown: Any = "redo") -> Any:
        """True the first time the block for ``key`` runs to its end; False after."""
        return self._once(key)

    def ledger(self, name: str) -> Any:
        return self._ledgers.setdefault(name, MemoryLedger())


class MemoryLedger:
    """:meth:`StepContext.ledger` in memory: ``done``, ``mark``, ``count``, ``pending``."""

    def __init__(self) -> None:
        self.items: set[str] = set()

    def done(self, item_id: Any) -> bool:
        return str(item_id) in self.items

    def mark(self, item_id: Any) -> None:
        self.items.add(str(item_id))

    def count(self) -> int:
        return len(self.items)

    def pending(self, items: Iterable[T], key: Callable[[T], Any] = str) -> Iterator[T]:
        for item in items:
            item_id = key(item)
            if not self.done(item_id):
                yield item
                self.mark(item_id)  # reached only after the loop body returned normally, as in the real ledger
