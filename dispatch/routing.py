"""Which queue a step's message goes to."""

from __future__ import annotations

from typing import Protocol

QUEUES = ("short", "long", "dispatch")


class Routable(Protocol):
    runtime: str
    queue: str | None


def queue_for(step: Routable) -> str:
    """A step's own ``queue=`` wins; otherwise its runtime names the queue."""
    return step.queue or ("long" if step.runtime == "long" else "short")
