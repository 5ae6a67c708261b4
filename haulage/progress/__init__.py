"""Progress: the Store protocol, its records, and the configured backend."""

from __future__ import annotations

import functools

from haulage.progress.models import (
    ACTIVE,
    TERMINAL,
    Checkpoint,
    Cost,
    Event,
    RunRecord,
    RunStatus,
    RunUpdate,
    StepCounts,
    StepRecord,
    StepStatus,
)
from haulage.progress.store import Store


@functools.cache
def get_store() -> Store:
    """The store chosen by HAULAGE_STORE, created on first use in this process."""
    from haulage.settings import get_settings

    settings = get_settings()
    if settings.store == "firestore":
        from haulage.progress.firestore_store import FirestoreStore  # type: ignore[import-not-found,unused-ignore]

        return FirestoreStore.from_settings()  # type: ignore[no-any-return,unused-ignore]
    from haulage.progress.redis_store import RedisStore
    from haulage.redis_client import get_redis

    return RedisStore(get_redis())


def reset_store() -> None:
    get_store.cache_clear()


__all__ = [
    "Store",
    "get_store",
    "reset_store",
    # records
    "RunRecord",
    "StepRecord",
    "Checkpoint",
    "RunUpdate",
    "Event",
    "Cost",
    "StepCounts",
    # statuses
    "RunStatus",
    "StepStatus",
    "TERMINAL",
    "ACTIVE",
]
