"""Where a step executes: local worker queues now; Cloud Run Jobs with fallback."""

from __future__ import annotations

from dispatch.routing import QUEUES, queue_for

__all__ = ["QUEUES", "queue_for"]
