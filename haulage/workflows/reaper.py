"""The stale-run reaper: resume runs whose heartbeat stopped, a bounded number of times.

A run is stale when it is PENDING or PROCESSING and its heartbeat (or, before
any step started, its creation) is older than HAULAGE_STALE_AFTER seconds. A
stale run with a step QUEUED for a retry that is still due is left alone: it
is waiting out its backoff, not dead. Otherwise it is resumed from its
checkpoints, at most HAULAGE_MAX_RECOVERIES times; after that it is marked
FAILED with the reason in its history. Beat runs the reaper every
HAULAGE_REAPER_INTERVAL seconds.

After a Redis restart the workers' sweep calls :func:`resend_after_restart`
for a while (:mod:`haulage.tasks.orphans`): a message kombu had popped but
not yet recorded when Redis died is gone from the broker, so a run that shows
no running step and has not moved for the lock liveness window since the
restart is resumed once, at once, rather than after HAULAGE_STALE_AFTER.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from haulage.errors import HaulageError
from haulage.progress import get_store
from haulage.progress.models import ACTIVE, Event, RunStatus, RunUpdate, StepStatus, now
from haulage.redis_client import get_redis
from haulage.settings import get_settings
from haulage.tasks.app import app
from haulage.tasks.ending import end_run
from haulage.tasks.orphans import RESTART_HOOKS, RESTART_WINDOW
from haulage.workflows.maintenance import MAINTENANCE
from haulage.workflows.run import resume_run

log = logging.getLogger("haulage.reaper")

#: seconds a retry may be overdue and still count as waiting (its message may sit in a busy queue)
RETRY_GRACE = 60.0


def stale_after() -> float:
    return get_settings().stale_after


def max_recoveries() -> int:
    return get_settings().max_recoveries


@dataclass
class ReapReport:
    resumed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  #: stale-looking, but a step is in its retry backoff


def reap(*, stale_seconds: float | None = None, limit_recoveries: int | None = None) -> ReapReport:
    """One pass over the active runs; see the module docstring."""
    store = get_store()
    stale_seconds = stale_after() if stale_seconds is None else stale_seconds
    limit = max_recoveries() if limit_recoveries is None else limit_recoveries
    report = ReapReport()
    cutoff = now() - stale_seconds
    for status in ACTIVE:
        for run in store.list_runs(status=status, limit=10_000):
            last_sign = run.heartbeat or run.created_at
            if last_sign > cutoff:
                continue
            if any(s.status is StepStatus.QUEUED and s.retry_at is not None and s.retry_at + RETRY_GRACE > now()
                   for s in store.list_steps(run.id)):  # fmt: skip
                report.waiting.append(run.id)
                continue
            idle = now() - last_sign
            if run.recoveries >= limit:
                reason = f"stale for {idle:.0f}s after {run.recoveries} recoveries; giving up"
                if end_run(store, run.id, RunStatus.FAILED,
                           RunUpdate(set={"error": reason, "message": reason, "finished_at": now()},
                                     events=[Event(now(), "reaped", reason)])):  # fmt: skip
                    report.failed.append(run.id)
                    log.error("run %s %s", run.id, reason)
                continue
            try:
                resume_run(run.id, reason=f"stale heartbeat ({idle:.0f}s); recovery {run.recoveries + 1} of {limit}")
            except HaulageError as exc:  # e.g. the workflow is no longer registered
                log.error("cannot resume stale run %s: %s", run.id, exc)
                continue
            report.resumed.append(run.id)
            log.warning("run %s was stale for %.0fs; resumed", run.id, idle)
    return report


@app.task(name="haulage.reap", typing=False, max_retries=None)
def reap_task() -> dict[str, list[str]]:
    """The beat job: one reaper pass."""
    result = reap()
    return {"resumed": result.resumed, "failed": result.failed, "waiting": result.waiting}


MAINTENANCE["haulage:reaper"] = {
    "task": "haulage.reap",
    "schedule": get_settings().reaper_interval,
    "options": {"queue": "short", "expires": get_settings().reaper_interval},
}


def resend_after_restart(restarted_at: float) -> list[str]:
    """Resume, once per restart, each active run that has been still since the restart; return their ids.

    A run with a step RUNNING is left to the orphan sweep and the lock's liveness; one waiting out a
    retry backoff is waiting. Any other that has been still for the liveness window may have lost a
    message: resuming re-sends its unfinished steps, and a step whose message did survive runs once
    anyway (the lock, then the create-if-absent checkpoint). Such a resume is not one of the run's
    HAULAGE_MAX_RECOVERIES: a healthy run queued behind a backlog may be resumed this way too.
    """
    settings = get_settings()
    cutoff = now() - settings.lock_liveness
    if restarted_at > cutoff:
        return []  # too soon: the steps in flight have not had their chance to be marked or swept yet
    store = get_store()
    client = get_redis()
    resumed = []
    for status in ACTIVE:
        for run in store.list_runs(status=status, limit=10_000):
            if (run.heartbeat or run.created_at) > cutoff:
                continue
            marker = f"{settings.key_prefix}:restart-resent:{restarted_at!r}:{run.id}"
            if client.exists(marker):
                continue
            steps = store.list_steps(run.id)
            waiting = any(
                s.status is StepStatus.RUNNING
                or (s.status is StepStatus.QUEUED and s.retry_at is not None and s.retry_at + RETRY_GRACE > now())
                for s in steps
            )
            if waiting or not client.set(marker, "1", nx=True, ex=int(RESTART_WINDOW) * 2):
                continue
            try:
                resume_run(run.id, reason="no progress since Redis restarted; its unfinished steps were sent again",
                           recovery=False)  # fmt: skip
            except HaulageError as exc:
                log.error("cannot resume run %s after the Redis restart: %s", run.id, exc)
                continue
            resumed.append(run.id)
            log.warning("run %s had not moved since Redis restarted; resumed", run.id)
    return resumed


RESTART_HOOKS.append(resend_after_restart)
