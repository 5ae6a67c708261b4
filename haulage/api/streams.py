"""How many event streams each user may hold open at once on one API process.

Every open stream costs a task, a thread-pool read per change and a slot in
the browser's connection budget; without a cap one token could open hundreds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from haulage.api.errors import TooManyRequests


class StreamLimits:
    """How many event streams each user holds open in this process; over the cap, 429.

    A thread lock, not an asyncio one: the counts are shared by every event
    loop of the process (a test client may run one per request).
    """

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, user_id: str) -> Callable[[], None]:
        """Count a new stream of ``user_id``; returns its (idempotent) release. TooManyRequests over the cap."""
        with self._lock:
            held = self._open.get(user_id, 0)
            if held >= self.per_user:
                raise TooManyRequests(
                    f"user {user_id!r} already follows {held} runs at once; the limit is {self.per_user} "
                    "(close a stream, or poll GET /v1/runs/{id})"
                )
            self._open[user_id] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._open.get(user_id, 1) - 1
                if left > 0:
                    self._open[user_id] = left
                else:
                    self._open.pop(user_id, None)

        return release

    def held(self, user_id: str) -> int:
        with self._lock:
            return self._open.get(user_id, 0)
