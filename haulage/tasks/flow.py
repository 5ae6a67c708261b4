"""What a step's Celery message carries besides its parameters, and what it returns.

A message holds the run id, the step key, the parameters and this small
``flow`` dict; values between steps go through the store, never the broker:
a step returns a reference to its checkpoint (``{"k": key, "ok": 1}``) or, in
a fan-out, a failure record that the next stage turns into a ``Failure``.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

InputKind = Literal["none", "value", "results"]


class Flow(TypedDict):
    workflow: str
    stage: int  #: index of the top-level stage this step belongs to
    stages: int  #: how many top-level stages the plan has
    item: int | None  #: index of the fan-out item, None outside a fan-out
    units: int  #: finished units that complete the stage (items x steps per item)
    input: InputKind  #: what the previous stage passes: nothing, a value, or fan-out results
    on_failure: str
    attempt: int
    last_error: NotRequired[list[str]]  #: [type, message] of an attempt killed at its hard time limit
    item_params: NotRequired[dict[str, Any]]  #: the fan-out item as given, reported with its failure
    label: NotRequired[str | None]  #: fan_out(label=...): a template formatted with the item's parameters
    fan_in: NotRequired[int]  #: on a fan-out item's last step: the item count its fan-in waits for (tasks/fan_in.py)


def ok_ref(key: str, item: int | None) -> dict[str, Any]:
    return {"k": key, "ok": 1, "i": item}


def failure_ref(key: str, item: int | None, error_type: str, message: str) -> dict[str, Any]:
    """A failed fan-out item's reference. Its parameters are not in it: they are kept in the store
    (:func:`params_key`), because Celery logs a task's return value and Flower shows it."""
    return {"k": key, "ok": 0, "i": item, "error_type": error_type, "message": message, "pk": params_key(key)}


def params_key(key: str) -> str:
    """The checkpoint key under which a failed item's parameters are kept ('!' is in no step key)."""
    return f"{key}!params"


def skipped_ref(key: str, item: int | None, reason: str) -> dict[str, Any]:
    return {"k": key, "ok": 0, "i": item, "skipped": reason}


def is_failure(ref: Any) -> bool:
    return isinstance(ref, dict) and ref.get("ok") == 0


def stage_percent(flow: Flow, finished_units: int) -> float:
    """Run percent once ``finished_units`` of this stage are done: earlier stages count whole."""
    fraction = min(finished_units / max(flow["units"], 1), 1.0)
    return round(100.0 * (flow["stage"] + fraction) / max(flow["stages"], 1), 1)
