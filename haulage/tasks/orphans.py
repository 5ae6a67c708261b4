"""Orphaned deliveries: a message whose worker died goes back to the front of its queue within seconds.

With ``task_acks_late`` a worker holds every message it runs, reserves or
keeps for a countdown in kombu's ``unacked`` hash (indexed by delivery time
in ``unacked_index``) until it acknowledges it. When the whole worker dies
(SIGKILL, OOM, a lost machine), nobody is left to give those messages back:
kombu redelivers them only after the visibility timeout (an hour by default),
and lowering that timeout is no cure, since it would also redeliver a long
step or a countdown retry that a live worker still holds.

So every worker's main process says which deliveries it holds: every
``PUBLISH_INTERVAL`` it marks their tags in Redis with a lifetime of
HAULAGE_LOCK_LIVENESS (:meth:`Coordination.hold_deliveries`). And one worker
at a time, every ``SWEEP_INTERVAL`` or so, sweeps: it reads the unacked
deliveries older than the liveness window (at most ``SWEEP_LIMIT`` a sweep,
from a delivery-time cursor that the next sweep starts from, so a backlog of
live workers' long-held deliveries never hides an orphan behind it), and puts
back those that no live worker marked, atomically
as kombu itself restores them (WATCH ``unacked``, then in one MULTI/EXEC:
remove from both indices, push the message), at the front of its queue
(kombu consumes with BRPOP, so RPUSH is the front). A sweep costs one range
read and one MGET over the messages in flight, whatever the number of runs.

A worker that is frozen rather than dead (its marks lapsed, its message put
back) is safe as before: the step lock and its liveness let one delivery run
the step at a time, and the checkpoint is create-if-absent.

One message escapes all of this: kombu pops a message (BRPOP) before it
records it as unacked, so a Redis that dies between the two loses it with no
trace in the broker. The sweeping worker therefore also watches Redis's
server id; when it changes (Redis restarted), every :data:`RESTART_HOOKS`
function is called every ``RESTART_HOOK_INTERVAL`` for ``RESTART_WINDOW`` seconds, and the
reaper's hook re-sends the unfinished steps of runs that have not moved since.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery, bootsteps, signals
from celery.worker import state

from haulage.coordination import Coordination, get_coordination
from haulage.keys import turn
from haulage.redis_client import get_redis
from haulage.settings import get_settings

log = logging.getLogger("haulage.orphans")

PUBLISH_INTERVAL = 1.0  #: seconds between a worker's marks of the deliveries it holds
SWEEP_INTERVAL = 2.0  #: seconds between sweeps, across all workers (one sweeps per turn)
SWEEP_LIMIT = 1000  #: unacked deliveries one sweep looks at, from its cursor on
TURN = "orphan-sweep"
RESTART_WINDOW = 300.0  #: seconds after a Redis restart during which the restart hooks run
RESTART_HOOK_INTERVAL = 2.0  #: seconds between calls of the hooks, across all workers (each lists the active runs)
RESTART_TURN = "restart-hooks"

#: called with the time Redis was seen restarted, every RESTART_HOOK_INTERVAL within ``RESTART_WINDOW``; the
#: workflows layer registers the reaper's re-send of stalled runs here (this layer must not import it)
RESTART_HOOKS: list[Callable[[float], object]] = []


def watch_restart() -> float | None:
    """When Redis was last seen restarted (its server id changed), if within ``RESTART_WINDOW``; else None.

    The last server id seen is kept in Redis itself (its append-only file brings it back after the
    restart), so whichever worker sweeps first notices, and any worker that sweeps later carries on.
    """
    client = get_redis()
    server = str(client.info("server")["run_id"])
    seen = client.getset(turn("redis-server"), server)
    if seen is not None and (seen.decode() if isinstance(seen, bytes) else str(seen)) != server:
        client.set(turn("redis-restarted"), repr(time.time()), ex=int(RESTART_WINDOW) + 60)
        log.warning("Redis restarted (server id %s); re-sending stalled runs' steps for %.0fs", server, RESTART_WINDOW)
    since = client.get(turn("redis-restarted"))
    if since is None:
        return None
    at = float(since)
    return at if time.time() - at < RESTART_WINDOW else None


def _tags(requests: Iterable[Any]) -> set[str]:
    found = set()
    for request in list(requests):
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag:
            found.add(str(tag))
    return found


def held_tags(consumer: Any) -> list[str]:
    """The delivery tags this worker holds: running, reserved, waiting out a countdown or ETA, or just received."""
    qos = getattr(getattr(getattr(consumer, "task_consumer", None), "channel", None), "qos", None)
    groups = (state.active_requests, state.reserved_requests, getattr(state, "scheduled_requests", ()))
    for _ in range(5):
        try:
            found = set().union(*(_tags(group) for group in groups), _tags(state.requests.values()))
            # kombu's own record of what this channel has not acknowledged: every held message, whatever Celery did.
            found.update(str(tag) for tag in list(getattr(qos, "_delivered", None) or ()))
            return sorted(found)
        except RuntimeError:  # the consumer's thread changed a set while we copied it: copy again
            continue
    return []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def task_of(raw: Any) -> tuple[str, str]:
    """(task name, task id) of an ``unacked`` entry (kombu stores ``[message, exchange, routing_key]``)."""
    try:
        headers = json.loads(_text(raw))[0].get("headers") or {}
        return str(headers.get("task") or ""), str(headers.get("id") or "")
    except (ValueError, IndexError, AttributeError, TypeError):
        return "", ""


class Cursor:
    """Where the next sweep starts: the delivery time (``unacked_index`` score) one sweep stopped at.

    Deliveries that live workers hold stay in the index, oldest first; without a
    cursor a sweep limited to ``SWEEP_LIMIT`` entries would read the same held
    ones every time and never reach an orphan delivered after them.
    """

    def __init__(self) -> None:
        self.score = float("-inf")


def sweep(app: Celery, channel: Any, coordination: Coordination, *, liveness: float,
          cursor: Cursor | None = None, limit: int = SWEEP_LIMIT) -> list[str]:  # fmt: skip
    """Put back the unacked deliveries older than ``liveness`` that no live worker holds; return their task ids.

    ``channel`` is a kombu Redis channel of the app's broker connection, so its
    transport options (``global_keyprefix``, key names, priorities) are the workers'.
    Only messages of this app's tasks are touched: another app on the same broker has its own workers.
    With a ``cursor`` a sweep reads ``limit`` deliveries from where the last one stopped, and starts
    over from the oldest once it reaches the window's edge; without one, the oldest ``limit``.
    """
    if not hasattr(channel, "unacked_index_key"):
        return []  # not kombu's Redis transport: nothing of this kind to sweep
    cursor = cursor or Cursor()
    restored = []
    with channel.conn_or_acquire() as client:
        ceil = time.time() - liveness
        index = channel.unacked_index_key
        # kombu's client adds global_keyprefix to the commands kombu itself uses; before 5.6 that list had
        # ZREVRANGEBYSCORE but not ZRANGE, so there the prefix is ours to add.
        prefix = getattr(client, "global_keyprefix", "") or ""
        if prefix and "ZRANGE" not in getattr(client, "PREFIXED_SIMPLE_COMMANDS", ("ZRANGE",)):
            index = prefix + index
        # The lower bound is inclusive: entries sharing the cursor's score are read again (a cheap re-check)
        # rather than skipped; only a page that is all one score moves past it, so the cursor always advances.
        page = client.zrange(index, cursor.score, ceil, byscore=True, offset=0, num=limit, withscores=True)
        old = [_text(t) for t, _ in page]
        if len(page) < limit:
            cursor.score = float("-inf")  # reached the window's edge: the next sweep starts from the oldest
        else:
            last = float(page[-1][1])
            cursor.score = last if last > float(page[0][1]) else math.nextafter(last, math.inf)
        for tag, held in zip(old, coordination.held_deliveries(old), strict=True):
            if held:
                continue
            raw = client.hget(channel.unacked_key, tag)
            name, task_id = task_of(raw) if raw is not None else ("", "")
            if raw is not None and name not in app.tasks:
                continue
            # WATCH unacked, read, then MULTI: drop from both indices and RPUSH (the front). An entry
            # acknowledged meanwhile aborts the transaction, and the retry finds nothing to push.
            channel.qos.restore_by_tag(tag, client=client)
            if raw is not None:
                restored.append(task_id)
                log.warning("put back task %s (%s): its worker died holding it (delivery %s)", task_id, name, tag)
    return restored


class _Loop:
    """The thread in a worker's main process that marks its deliveries and takes its turns at the sweep."""

    def __init__(self, app: Celery, consumer: Any) -> None:
        self.app = app
        self.consumer = consumer
        self.stopped = threading.Event()
        self.sweeping = True  #: off while the consumer is stopped; marking goes on until the worker shuts down
        self.token = uuid.uuid4().hex
        self.connection: Any = None
        self.cursor = Cursor()

    def run(self) -> None:
        next_sweep = 0.0
        while not self.stopped.is_set():
            try:
                coordination = get_coordination()
                liveness = get_settings().lock_liveness
                coordination.hold_deliveries(held_tags(self.consumer), liveness)
                if self.sweeping and time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_INTERVAL
                    if coordination.take_turn(TURN, self.token, SWEEP_INTERVAL):
                        sweep(self.app, self.channel(), coordination, liveness=liveness, cursor=self.cursor)
                        restarted = watch_restart()
                        if restarted is not None and coordination.take_turn(RESTART_TURN, self.token,
                                                                            RESTART_HOOK_INTERVAL):  # fmt: skip
                            for hook in RESTART_HOOKS:
                                hook(restarted)
            except Exception:  # Redis or the broker away: log it and try again next beat; this thread must live on
                log.exception("orphan sweep: marking held deliveries or sweeping failed; trying again")
                self.close()
            self.stopped.wait(PUBLISH_INTERVAL)
        self.close()

    def channel(self) -> Any:
        # A connection of its own: the consumer's belongs to the consumer's thread.
        if self.connection is None:
            self.connection = self.app.connection_for_write()
        return self.connection.default_channel

    def close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.release()
            finally:
                self.connection = None


_loop: _Loop | None = None  #: one per worker process, across consumer restarts


class OrphanSweep(bootsteps.StartStopStep):
    """Consumer bootstep: starts this worker's :class:`_Loop` and lets it sweep while the worker consumes.

    Stopping the consumer (a warm shutdown, a lost broker connection) stops only
    the sweeping: the steps still running go on being marked as held until the
    pool has drained (``worker_shutdown``), or another worker would put their
    messages back while they run.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        global _loop
        if _loop is None or _loop.stopped.is_set():
            _loop = _Loop(parent.app, parent)
            threading.Thread(target=_loop.run, name="haulage-orphans", daemon=True).start()
        _loop.consumer = parent
        _loop.sweeping = True

    def stop(self, parent: Any) -> None:
        if _loop is not None:
            _loop.sweeping = False

    shutdown = stop


@signals.worker_shutdown.connect
def _stop_marking(**_: Any) -> None:
    """The pool has drained: nothing this worker holds is still running."""
    if _loop is not None:
        _loop.stopped.set()
