"""Buffered changes written when the process ends: atexit, and Celery's hook for prefork children."""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Any, Protocol

from celery import signals

log = logging.getLogger("haulage.progress.firestore")


class _Closable(Protocol):
    def close_at_exit(self) -> None: ...


_live_stores: weakref.WeakSet[_Closable] = weakref.WeakSet()
_exit_hooks_lock = threading.Lock()
_exit_hooks_installed = False


def close_at_exit(store: _Closable) -> None:
    """Write ``store``'s buffers when the process ends normally (the hooks are installed with the first store)."""
    global _exit_hooks_installed
    with _exit_hooks_lock:
        _live_stores.add(store)
        if _exit_hooks_installed:
            return
        _exit_hooks_installed = True
        atexit.register(_close_stores)
        # Celery's prefork children leave through os._exit, which skips atexit;
        # the pool's exit hook (worker_process_shutdown) is their last chance.
        signals.worker_process_shutdown.connect(_close_stores, weak=False, dispatch_uid="haulage-firestore-close")


def _close_stores(*_args: Any, **_kwargs: Any) -> None:
    for store in list(_live_stores):
        try:
            store.close_at_exit()
        except Exception:  # at exit there is no one left to raise to
            log.exception("writing buffered run changes at exit failed")
