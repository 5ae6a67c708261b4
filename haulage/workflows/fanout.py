"""Expanding a fan-out stage: the ``haulage.fan_out`` task.

When the chain reaches a fan-out stage, this task reads the stage's items (the
static list, or the previous stage's output), checks each against the first
step's parameters, counts them on the run once, and publishes one signature
(or one chain) per item. Each item's step key comes from its position:
``1:analyze_page[17]``. The fan-in is Haulage's own (``haulage.tasks.fan_in``),
not a Celery chord: this task keeps the rest of the chain, and the last item to
land publishes it, with the Results the next stage receives read from there.
A large fan-out is published in chunks of ``PUBLISH_CHUNK`` by tasks of their
own (``haulage.fan_out_publish``), so that no one message holds all N items
and the publishing is shared by the workers.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import chain
from celery.canvas import Signature
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from haulage.coordination import get_coordination
from haulage.dispatch.dispatcher import signature_for
from haulage.errors import HaulageError, PlanError
from haulage.jsonutil import dumps
from haulage.progress import get_store
from haulage.progress.models import Checkpoint, Event, FailureEntry, RunUpdate, StepRecord, StepStatus, now
from haulage.progress.store import Store
from haulage.tasks.app import app
from haulage.tasks.checkpoints import build_input, input_keys
from haulage.tasks.ending import fail_run
from haulage.tasks.fan_in import LEASE_SECONDS, ContinuationUnpublished, publish_continuation, resolve_or_retry
from haulage.tasks.flow import Flow, failure_ref, skipped_ref
from haulage.tasks.records import item_label, item_rows_max, keep_failure_params, mark_processing
from haulage.tasks.step import get_step

log = logging.getLogger("haulage.fanout")

#: items published per ``haulage.fan_out_publish`` task when a fan-out has more than this many
PUBLISH_CHUNK = 500
PUBLISH_RETRY = 2.0  #: seconds before a publish the broker refused is tried again


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
            "label": spec.get("label"),
        }
        if n == len(subs) - 1:
            item_flow["fan_in"] = count  # the item's last step reports its final reference to the fan-in
        key = item_key(flow["stage"], n, len(subs), step.name, index)
        # Nothing reads an item's Celery result (the fan-in is in the coordination seam): skip the
        # result backend's STARTED and SUCCESS writes, two round trips and a publish each.
        sig = signature_for(step, run_id=run_id, key=key, params=params, flow=item_flow).set(ignore_result=True)
        sigs.append(sig)
    return sigs[0] if len(sigs) == 1 else chain(*sigs)


@app.task(name="haulage.fan_out_refused", typing=False)
def refused_item(*_: Any, ref: dict[str, Any]) -> dict[str, Any]:
    """Stood in the chord for an item refused at expansion; kept for messages sent before the fan-in was Haulage's."""
    return ref


@app.task(name="haulage.fan_out", bind=True, typing=False, max_retries=None)
def expand_fan_out(task: Any, *args: Any, run_id: str, key: str, spec: dict[str, Any], flow: Flow) -> Any:
    """Publish a fan-out stage's items; the last of them to land carries on with the rest of the chain."""
    store = get_store()
    prev = resolve_or_retry(task, args[0] if args else None)
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
        units = (len(items) - len(refused)) * subs + len(refused)
        store.update_run(
            run_id,
            RunUpdate(
                set={f"stages.{flow['stage']}.total": units},  # the stage's total, before any item is counted
                incr={"steps.total": units},
                events=[
                    Event(now(), "fan-out", f"fan-out over {len(items)} item(s) of {spec['steps'][0]['step']}", key)
                ],  # fmt: skip
            ),
        )
        for index, message in refused.items():
            _record_refusal(store, run_id, spec, flow, index, message, items[index])
        store.create_item_rows(run_id, _queued_rows(spec, flow, items, refused))
    if not items:
        return []
    stage, total = flow["stage"], len(items)
    # The rest of the chain waits in the fan-in for the last item, instead of following this task.
    # A redelivery of this message (same task id) keeps the fan-in's failures; a resume (new id) clears them.
    rest = list(task.request.chain or [])
    get_coordination().fan_in_open(run_id, stage, rest, opener=task.request.id)
    task.request.chain = None
    try:
        _publish_all(task, run_id, spec, flow, items, total, refused)
    except (OperationalError, RedisError, ContinuationUnpublished) as exc:
        # Acked now, the items not yet published would wait for the reaper; the retry publishes them again
        # (an item published twice runs once: its lock, then its checkpoint). The retry's message is built
        # from this request: it must carry the rest of the chain again, or its fan_in_open would store none.
        task.request.chain = rest
        raise task.retry(countdown=PUBLISH_RETRY, max_retries=None) from exc
    return {"fan_out": total}


def _publish_all(task: Any, run_id: str, spec: dict[str, Any], flow: Flow, items: list[Any], total: int,
                 refused: dict[int, str]) -> None:  # fmt: skip
    stage = flow["stage"]
    bare = {**spec, "items": None}  # the chunks carry their own items
    with app.producer_or_acquire() as producer:
        if total <= PUBLISH_CHUNK:
            _publish_items(run_id, bare, flow, 0, items, total, refused, producer)
        else:
            for start in range(0, total, PUBLISH_CHUNK):
                chunk = items[start : start + PUBLISH_CHUNK]
                gaps = {str(i): refused[i] for i in range(start, start + len(chunk)) if i in refused}
                sig = publish_items.s(run_id=run_id, spec=bare, flow=flow, start=start, items=chunk, total=total,
                                      refused=gaps)  # fmt: skip
                sig.set(queue="short", ignore_result=True).apply_async(producer=producer)
    if refused:
        refs = {i: _refusal_ref(spec, flow, i, items[i], message) for i, message in refused.items()}
        if get_coordination().fan_in_add(run_id, stage, refs, total, task.request.id, LEASE_SECONDS):
            publish_continuation(run_id, stage, total)  # every item was refused, or the others landed already


@app.task(name="haulage.fan_out_publish", bind=True, typing=False, max_retries=None)
def publish_items(task: Any, *, run_id: str, spec: dict[str, Any], flow: Flow, start: int, items: list[Any],
                  total: int, refused: dict[str, str]) -> None:  # fmt: skip
    """Publish one chunk of a large fan-out's items (a retry publishes it again: the items dedupe)."""
    try:
        status, _ = get_store().load_step_state(run_id, [])
        if status is None or status.terminal:
            return
        with app.producer_or_acquire() as producer:
            _publish_items(run_id, spec, flow, start, items, total, {int(i): m for i, m in refused.items()},
                           producer)  # fmt: skip
    except (OperationalError, RedisError) as exc:
        raise task.retry(countdown=PUBLISH_RETRY, max_retries=None) from exc


def _publish_items(run_id: str, spec: dict[str, Any], flow: Flow, start: int, items: list[Any], total: int,
                   refused: dict[int, str], producer: Any) -> None:  # fmt: skip
    for offset, item in enumerate(items):
        index = start + offset
        if index not in refused:  # a refused item's failure was recorded in the fan-in at expansion
            item_signature(run_id, spec, flow, index, item, total).apply_async(producer=producer)


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
    return failure_ref(key, index, "PlanError", message)  # its parameters: _record_refusal keeps them in the store


def _queued_rows(spec: dict[str, Any], flow: Flow, items: list[Any], refused: dict[int, str]) -> list[StepRecord]:
    """The QUEUED rows of the stage's first HAULAGE_ITEM_ROWS_MAX items (refused ones have their FAILED row)."""
    subs, rows = spec["steps"], []
    for index, item in enumerate(items[: item_rows_max()]):
        if index in refused:
            continue
        label = item_label(spec.get("label"), item)
        for n, sub in enumerate(subs):
            rows.append(StepRecord(item_key(flow["stage"], n, len(subs), sub["step"], index), sub["step"],
                                   StepStatus.QUEUED, 1, stage=flow["stage"], index=index, label=label))  # fmt: skip
    return rows


def items_params(item: Any) -> dict[str, Any]:
    """A refused item's parameters as its failure reports them (an item that is not a dict, wrapped)."""
    return item if isinstance(item, dict) else {"item": item}


def _record_refusal(store: Store, run_id: str, spec: dict[str, Any], flow: Flow, index: int, message: str,
                    item: Any = None) -> None:  # fmt: skip
    """The refused item's step record and the run's failure count, as a step that failed would leave them."""
    name = spec["steps"][0]["step"]
    key = item_key(flow["stage"], 0, len(spec["steps"]), name, index)
    params = items_params(item)
    keep_failure_params(store, run_id, key, name, params)  # for the fan-in; never in a task's return value
    label = item_label(spec.get("label"), params)
    store.put_step(run_id, StepRecord(key, name, StepStatus.FAILED, 0, error_type="PlanError", error=message,
                                      stage=flow["stage"], index=index, label=label, finished_at=now()))  # fmt: skip
    event = Event(now(), "step-failed", f"{name} refused: {message}", key)
    entry = FailureEntry(step=key, name=name, error_type="PlanError", message=message, index=index, label=label,
                         params=params, stage=flow["stage"])  # fmt: skip
    store.update_run(run_id, RunUpdate(incr={"steps.failed": 1, f"stages.{flow['stage']}.failed": 1}, events=[event],
                                       failures=[entry]))  # fmt: skip
    log.error("step %s of run %s refused: %s", key, run_id, message)
