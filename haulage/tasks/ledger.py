"""A processed-item ledger: a retried or resumed step skips the items that already landed.

>>> ledger = ctx.ledger("rows")
>>> for row in ledger.pending(rows, key=lambda r: r["id"]):
...     write(row)                  # marked done once the loop moves past it

The ledger is a Redis set per (run, step, name), whatever the store; an item
is marked after its work returned, so a crash between the work and the mark
repeats that one item (make the work idempotent per item to close the gap).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import redis

from haulage import keys

T = TypeVar("T")


class Ledger:
    def __init__(self, client: redis.Redis, run_id: str, step_key: str, name: str) -> None:
        self.client = client
        self.key = keys.ledger(run_id, step_key, name)

    def done(self, item_id: Any) -> bool:
        return bool(self.client.sismember(self.key, str(item_id)))

    def mark(self, item_id: Any) -> None:
        self.client.sadd(self.key, str(item_id))

    def count(self) -> int:
        return int(self.client.scard(self.key))

    def pending(self, items: Iterable[T], key: Callable[[T], Any] = str) -> Iterator[T]:
        """Yield the items not yet done; each is marked when the caller asks for the next one (or the loop ends)."""
        materialised = list(items)
        ids = [str(key(item)) for item in materialised]
        seen = self.client.smismember(self.key, ids) if ids else []
        for item, item_id, already in zip(materialised, ids, seen, strict=True):
            if already:
                continue
            yield item
            self.mark(item_id)  # reached only after the loop body returned normally
