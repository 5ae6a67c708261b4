"""Progress: the Store protocol, its records, and the configured backend."""

from __future__ import annotations

import functools

from haulage.progress.memory_store import MemoryStore
from haulage.progress.models import (
    ACTIVE,
    SCHEMA_VERSION,
    TERMINAL,
    Checkpoint,
    Cost,
    Event,
    FailureEntry,
    RunRecord,
    RunStatus,
    RunUpdate,
    StageCounts,
    StepCounts,
    StepRecord,
    StepStatus,
)
from haulage.progress.redis_store import RedisStore
from haulage.progress.store import Store
from haulage.redis_client import get_redis
from haulage.settings import get_settings


@functools.cache
def get_store() -> Store:
    """The store chosen by HAULAGE_STORE, created on first use in this process."""
    settings = get_settings()
    if settings.store == "firestore":
        # Imported here: google-cloud-firestore is the optional `firestore` extra.
        from haulage.progress.firestore import FirestoreStore  # type: ignore[import-not-found,unused-ignore]

        return FirestoreStore.from_settings()  # type: ignore[no-any-return,unused-ignore]
    return RedisStore(get_redis())


def reset_store() -> None:
    get_store.cache_clear()


__all__ = [
    "Store",
    "get_store",
    "reset_store",
    # backends (FirestoreStore is in haulage.progress.firestore: it needs the `firestore` extra)
    "RedisStore",
    "MemoryStore",
    # records
    "RunRecord",
    "StepRecord",
    "Checkpoint",
    "RunUpdate",
    "Event",
    "Cost",
    "StepCounts",
    "StageCounts",
    "FailureEntry",
    "SCHEMA_VERSION",
    # statuses
    "RunStatus",
    "StepStatus",
    "TERMINAL",
    "ACTIVE",
]
