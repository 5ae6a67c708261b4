"""Change feeds on a run document: a Firestore snapshot listener."""

from __future__ import annotations

import threading
from typing import Any


class SnapshotFeed:
    """A snapshot listener on the run document; its callback runs on the client's thread."""

    def __init__(self, ref: Any) -> None:
        self.changed = threading.Event()
        self.watch = ref.on_snapshot(lambda *_: self.changed.set())

    def wait(self, timeout: float) -> bool:
        fired = self.changed.wait(timeout)
        self.changed.clear()
        return fired

    def close(self) -> None:
        self.watch.unsubscribe()
