"""A processed-item ledger: a retried or resumed step skips the items that already landed.

>>> ledger = ctx.ledger("rows")
>>> for row in ledger.pending(rows, key=lambda r: r["id"]):
...     write(row)                  # marked done once the loop moves past it

The ledger lives in the coordination seam (a Redis set per (run, step, name)),
whatever the store; an item is marked after its work returned, so a crash
between the work and the mark repeats that one item (make the work idempotent
per item to close the gap).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from haulage import keys
from haulage.coordination import Coordination

T = TypeVar("T")


class Ledger:
    def __init__(self, coordination: Coordination, run_id: str, step_key: str, name: str) -> None:
        self.coordination = coordination
        self.run_id, self.step_key, self.name = run_id, step_key, name
        self.key = keys.ledger(run_id, step_key, name)  #: where the ledger lives, for inspection

    def done(self, item_id: Any) -> bool:
        return self.coordination.ledger_contains(self.run_id, self.step_key, self.name, [str(item_id)])[0]

    def mark(self, item_id: Any) -> None:
        self.coordination.ledger_add(self.run_id, self.step_key, self.name, str(item_id))

    def count(self) -> int:
        return self.coordination.ledger_count(self.run_id, self.step_key, self.name)

    def pending(self, items: Iterable[T], key: Callable[[T], Any] = str) -> Iterator[T]:
        """Yield the items not yet done; each is marked when the caller asks for the next one (or the loop ends)."""
        materialised = list(items)
        ids = [str(key(item)) for item in materialised]
        seen = self.coordination.ledger_contains(self.run_id, self.step_key, self.name, ids)
        for item, item_id, already in zip(materialised, ids, seen, strict=True):
            if already:
                continue
            yield item
            self.mark(item_id)  # reached only after the loop body returned normally
