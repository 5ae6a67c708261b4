"""JSON helpers: Haulage stores and sends JSON only, never pickle."""

from __future__ import annotations

import json
from typing import Any


def dumps(value: Any) -> str:
    """Compact JSON; raises TypeError/ValueError for values JSON cannot hold."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def loads(raw: str | bytes) -> Any:
    return json.loads(raw)


def check_serializable(value: Any) -> str | None:
    """Return None if ``value`` is JSON-serialisable, else a short reason."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None
