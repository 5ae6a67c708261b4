"""Haulage's own fan-in: the last item of a fan-out to land publishes the rest of the chain.

Celery's chord keeps its bookkeeping per header task in the result backend and
hands the body one message holding every result; on Redis its cost per item
grows with the fan-out (a bare chord of 10,000 took 376 s on 2 cores). Instead,
when a fan-out expands (``haulage.workflows.fanout``) it keeps the rest of the
chain in the coordination seam (:meth:`Coordination.fan_in_open`), and each
item's last step, once it has its final reference (a checkpoint, or a failure
after its retries), records it there in one atomic script
(:meth:`Coordination.fan_in_add`): O(1) per item, whatever N is. The one
arrival that completes the stage, and holds the publish lease, publishes the
continuation with a small marker (:func:`marker`) as its input; the next stage
reads the references through :func:`resolve_input`, in one read.

Exactly once, under crashes:
- recording is idempotent per item (a hash field per item index): a
  redelivered or replayed item changes nothing, and cannot complete the stage twice;
- the publisher holds a lease named after its delivery: if it dies before the
  continuation is in the broker, the redelivered message (same task id) takes
  the same lease and publishes; a lease left by a publisher that never comes back
  lapses after ``LEASE_SECONDS``, and a resume (re-expansion) clears it;
- once published it is marked continued; a duplicate publish (a crash between
  the two) is harmless: every step of the continuation is checkpointed and locked.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signature
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from haulage.coordination import get_coordination
from haulage.errors import HaulageError
from haulage.tasks.app import app
from haulage.tasks.flow import Flow

log = logging.getLogger("haulage.fan_in")

#: seconds a publisher's lease on the continuation lasts if it dies holding it
LEASE_SECONDS = 30.0


def marker(run_id: str, stage: int, total: int) -> dict[str, Any]:
    """What the continuation gets as its input instead of N references: where to read them."""
    return {"fan_in": stage, "run": run_id, "n": total}


def is_marker(value: Any) -> bool:
    return isinstance(value, dict) and "fan_in" in value and "run" in value


#: seconds a stage after a fan-out waits before it looks again for items still to land
FAN_IN_WAIT = 2.0


class ContinuationUnpublished(HaulageError):
    """The broker refused the stage after a fan-out: the task that found the stage complete retries (same lease)."""


class FanInIncomplete(HaulageError):
    """The fan-in's marker arrived before all its items' references (a resumed run re-runs failed items)."""


def resolve_input(prev: Any) -> Any:
    """The list of item references a fan-in marker stands for; any other input as it is.

    A continuation published before a resume may run while the resumed run's re-run items are still
    on their way (the resume cleared their failures): it must wait for them, not go on with part of
    the stage and checkpoint that for good.
    """
    if not is_marker(prev):
        return prev
    refs = get_coordination().fan_in_refs(prev["run"], int(prev["fan_in"]))
    if len(refs) < int(prev.get("n", 0)):
        raise FanInIncomplete(
            f"stage {prev['fan_in']} of run {prev['run']}: {len(refs)} of {prev['n']} items "
            "have landed; waiting for the rest"
        )
    return refs


def report_or_retry(task: Any, run_id: str, flow: Flow, ref: Any, countdown: float = FAN_IN_WAIT) -> None:
    """:func:`report_item` in a bound task: a Redis or broker error comes back later, never acked unreported."""
    try:
        report_item(run_id, flow, ref, task.request.id)
    except (RedisError, ContinuationUnpublished) as exc:
        raise task.retry(countdown=countdown, max_retries=None) from exc


def resolve_or_retry(task: Any, prev: Any) -> Any:
    """:func:`resolve_input` in a bound task: an incomplete fan-in comes back later (not an attempt)."""
    try:
        return resolve_input(prev)
    except FanInIncomplete as exc:
        log.info("%s", exc)
        raise task.retry(countdown=FAN_IN_WAIT, max_retries=None) from exc


def report_item(run_id: str, flow: Flow, ref: Any, token: str) -> None:
    """An item's last step has its final reference: record it, and publish the continuation if it was the last.

    ``token`` names the delivery (its Celery task id): a redelivery of the same
    message may publish in its place when it died holding the lease.
    """
    total, item = flow.get("fan_in"), flow.get("item")
    if total is None or item is None or not isinstance(ref, dict):
        return
    coordination = get_coordination()
    if coordination.fan_in_add(run_id, flow["stage"], {item: ref}, int(total), token, LEASE_SECONDS):
        publish_continuation(run_id, flow["stage"], int(total))


def publish_continuation(run_id: str, stage: int, total: int) -> None:
    """Send the rest of the chain on, its first task getting the fan-in's marker; then mark it continued."""
    coordination = get_coordination()
    rest = coordination.fan_in_continuation(run_id, stage)
    if rest:
        nxt = signature(rest[-1], app=app)
        try:
            # As Celery's own chain does: the next task gets the rest of the chain in its options.
            nxt.apply_async((marker(run_id, stage, total),), chain=rest[:-1] or None)
        except (OperationalError, RedisError, OSError) as exc:
            # The references are recorded and this delivery holds the lease: its retry (the same task id)
            # finds the stage complete again and publishes. Acking it instead would leave the run to the reaper.
            log.warning("run %s: cannot publish what follows fan-out stage %s (%s); retrying", run_id, stage, exc)
            raise ContinuationUnpublished(
                f"run {run_id}: publishing what follows fan-out stage {stage}: {exc}"
            ) from exc
    coordination.fan_in_continued(run_id, stage)
