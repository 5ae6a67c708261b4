"""Expanding a fan-out stage: the ``haulage.fan_out`` task.

When the chain reaches a fan-out stage, this task reads the stage's items (the
static list, or the previous stage's output), checks each against the first
step's parameters, counts them on the run once, and replaces itself with a
group of one signature (or one chain) per item, whose Results the next stage
receives. Each item's step key comes from its position: ``1:analyze_page[17]``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import chain, group
from celery.canvas import Signature

from haulage.dispatch.dispatcher import signature_for
from haulage.errors import HaulageError, PlanError
from haulage.jsonutil import dumps
from haulage.progress import get_store
from haulage.progress.models import Checkpoint, Event, RunUpdate, StepRecord, StepStatus, now
from haulage.progress.store import Store
from haulage.tasks.app import app
from haulage.tasks.checkpoints import build_input, input_keys
from haulage.tasks.ending import fail_run
from haulage.tasks.flow import Flow, failure_ref, skipped_ref
from haulage.tasks.records import mark_processing
from haulage.tasks.step import get_step

log = logging.getLogger("haulage.fanout")


def item_key(stage: int, sub_index: int, sub_count: int, name: str, item: int) -> str:
    """Deterministic key of a fan-out item's step, from its position: ``1:analyze_page[17]``."""
    where = str(stage) if sub_count == 1 else f"{stage}.{sub_index}"
    return f"{where}:{name}[{item}]"


def item_signature(run_id: str, spec: dict[str, Any], flow: Flow, index: int, item: dict[str, Any],
                   count: int) -> Signature:  # fmt: skip
    subs = spec["steps"]
    sigs = []
    for n, sub in enumerate(subs):
        step = get_step(sub["step"])
        params = {**sub["params"], **spec["kwargs"], **item} if n == 0 else dict(sub["params"])
        item_flow: Flow = {
            **flow,
            "item": index,
            "units": count * len(subs),
            "input": "none" if n == 0 else "value",
            "attempt": 1,
            "item_params": item,
        }
        key = item_key(flow["stage"], n, len(subs), step.name, index)
        sigs.append(signature_for(step, run_id=run_id, key=key, params=params, flow=item_flow))
    return sigs[0] if len(sigs) == 1 else chain(*sigs)


@app.task(name="haulage.fan_out_refused", typing=False)
def refused_item(*_: Any, ref: dict[str, Any]) -> dict[str, Any]:
    """Stands in the chord for an item refused at expansion: its failure reaches the fan-in like any other."""
    return ref


@app.task(name="haulage.fan_out", bind=True, typing=False, max_retries=None)
def expand_fan_out(task: Any, *args: Any, run_id: str, key: str, spec: dict[str, Any], flow: Flow) -> Any:
    """Expand a fan-out stage into a chord of its items, then carry on with the rest of the chain."""
    store = get_store()
    prev = args[0] if args else None
    dynamic = spec["items"] is None
    status, cps = store.load_step_state(run_id, [key, *input_keys(flow, prev)])
    if status is None or status.terminal:
        return skipped_ref(key, None, status.value if status else "missing")
    try:
        items = spec["items"] if not dynamic else build_input(flow, prev, cps)[0][0]
        items, refused = _check_items(items, spec, flow)
    except (PlanError, HaulageError) as exc:
        fail_run(store, run_id, str(exc), key)
        return skipped_ref(key, None, "failed")
    mark_processing(store, run_id, flow)
    subs = len(spec["steps"])
    if store.put_checkpoint(run_id, Checkpoint(key, "fan_out", {"count": len(items)})):
        # First expansion only: a resume re-expands but must not count the items twice.
        # A refused item counts as the one step that failed; the rest of its chain never runs.
        store.update_run(
            run_id,
            RunUpdate(
                incr={"steps.total": (len(items) - len(refused)) * subs + len(refused)},
                events=[
                    Event(now(), "fan-out", f"fan-out over {len(items)} item(s) of {spec['steps'][0]['step']}", key)
                ],  # fmt: skip
            ),
        )
        for index, message in refused.items():
            _record_refusal(store, run_id, spec, flow, index, message)
    if not items:
        return []
    header = group(
        refused_item.s(ref=_refusal_ref(spec, flow, i, item, refused[i])).set(queue="short")
        if i in refused
        else item_signature(run_id, spec, flow, i, item, len(items))
        for i, item in enumerate(items)
    )
    return task.replace(header)


def _check_items(items: Any, spec: dict[str, Any], flow: Flow) -> tuple[list[Any], dict[int, str]]:
    """The items, and the reason each one that cannot be called is refused (by index).

    A list that is not a list is the plan's fault and fails the run; one malformed item
    (not a dict, a missing or unknown parameter) is that item's failure, as if its step had
    raised, so the others still run and ``on_failure`` decides the run's outcome.
    """
    first = get_step(spec["steps"][0]["step"])
    source = "the previous stage's output" if spec["items"] is None else "the fan-out items"
    if not isinstance(items, list):
        raise PlanError(f"fan-out over {first.name!r}: {source} must be a list of dicts, got {type(items).__name__}")
    refused: dict[int, str] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            refused[i] = (f"fan-out over {first.name!r}: item {i} of {source} must be a dict of parameters, "
                          f"got {type(item).__name__}: {dumps(item)[:80]}")  # fmt: skip
            continue
        try:
            first.check_kwargs({**spec["steps"][0]["params"], **spec["kwargs"], **item}, takes_input=False,
                               where=f"fan-out item {i}")  # fmt: skip
        except PlanError as exc:
            refused[i] = str(exc)
    return items, refused


def _refusal_ref(spec: dict[str, Any], flow: Flow, index: int, item: Any, message: str) -> dict[str, Any]:
    key = item_key(flow["stage"], 0, len(spec["steps"]), spec["steps"][0]["step"], index)
    return failure_ref(key, index, item if isinstance(item, dict) else {"item": item}, "PlanError", message)


def _record_refusal(store: Store, run_id: str, spec: dict[str, Any], flow: Flow, index: int, message: str) -> None:
    """The refused item's step record and the run's failure count, as a step that failed would leave them."""
    name = spec["steps"][0]["step"]
    key = item_key(flow["stage"], 0, len(spec["steps"]), name, index)
    store.put_step(run_id, StepRecord(key, name, StepStatus.FAILED, 0, error_type="PlanError", error=message))
    event = Event(now(), "step-failed", f"{name} refused: {message}", key)
    store.update_run(run_id, RunUpdate(incr={"steps.failed": 1}, events=[event]))
    log.error("step %s of run %s refused: %s", key, run_id, message)
