"""``@workflow``: a named, validated entry point that starts durable runs."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import Any

from celery.schedules import crontab
from celery.schedules import schedule as celery_schedule
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from haulage.errors import (
    BrokerUnavailable,
    ConfigError,
    IdempotencyConflict,
    InvalidParams,
    ParamsTooLarge,
    StoreUnavailable,
)
from haulage.jsonutil import dumps
from haulage.progress import get_store
from haulage.progress.models import Event, RunRecord, RunStatus, StepCounts, now
from haulage.settings import get_settings
from haulage.tasks.agreement import check as check_agreement
from haulage.tasks.app import app
from haulage.workflows import registry
from haulage.workflows.params import params_model, validate_params
from haulage.workflows.plan import Chain, as_plan, compile_plan, plan_stages, plan_steps
from haulage.workflows.run import Run

ON_FAILURE = ("collect", "fail")
#: seconds start() waits for a broker (other than HAULAGE_REDIS_URL) to answer before BrokerUnavailable
BROKER_CHECK_TIMEOUT = 2.0
#: maps (completion event, results) of a finished run to its follow-up's parameters
FollowUpParams = Callable[[dict[str, Any], Any], dict[str, Any]]
#: creators the engine itself starts runs as (schedules); no API caller may act under these ids
SCHEDULER = "haulage-beat"
RESERVED_CREATORS = frozenset({SCHEDULER})
# Run ids for idempotency keys are derived, so the same key always names the same run.
_IDEMPOTENCY_NS = uuid.UUID("6f1f3c0e-54b7-4d8e-9a43-1f0d3c2b9a10")


class Workflow:
    """A registered workflow; ``start(**params)`` begins a run and returns at once."""

    def __init__(self, func: Callable[..., Any], *, name: str, on_failure: str, schedule: Any = None,
                 schedule_params: dict[str, Any] | None = None, on_complete: str | None = None,
                 on_complete_params: FollowUpParams | None = None,
                 max_params_bytes: int | None = None) -> None:  # fmt: skip
        self.func = func
        self.max_params_bytes = max_params_bytes  #: None = HAULAGE_MAX_PARAMS_BYTES
        self.name = name
        self.on_failure = on_failure
        self.schedule = schedule
        self.schedule_params = schedule_params
        self.on_complete = on_complete
        self.on_complete_params = on_complete_params
        self.params_model = params_model(name, func)
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"<workflow {self.name}>"

    def parameters_schema(self) -> dict[str, Any]:
        """JSON Schema of the parameters (for the CLI, the HTTP service and docs)."""
        return self.params_model.model_json_schema()

    def validate(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Raise InvalidParams naming each wrong or missing field; return (values, JSON form)."""
        return validate_params(self.name, self.params_model, params)

    def check_params_size(self, json_params: dict[str, Any], field: str = "(parameters)") -> None:
        """Raise ParamsTooLarge when the parameters' JSON is over this workflow's limit.

        Parameters are stored in the run document and sent to every step: a
        cap keeps one caller from filling Redis or a listing with megabytes.
        """
        limit = self.max_params_bytes or get_settings().max_params_bytes
        size = len(dumps(json_params).encode())
        if size > limit:
            raise ParamsTooLarge(self.name, size, limit, field)

    def build_plan(self, values: dict[str, Any]) -> Chain:
        return as_plan(self.func(**values), self.name)

    def start(self, *, created_by: str | None = None, idempotency_key: str | None = None,
              tags: list[str] | None = None, **params: Any) -> Run:  # fmt: skip
        """Validate, record and enqueue a run; return its handle without waiting.

        The same ``idempotency_key`` returns the same run (and raises
        IdempotencyConflict if the parameters differ). Nothing is written or
        enqueued when the parameters or the plan are invalid, when the broker
        is unreachable (BrokerUnavailable, at once), or when the live workers'
        settings disagree with this process's (ConfigMismatch); a run that
        cannot be enqueued is removed again.
        """
        _check_meta(self.name, created_by, idempotency_key, tags)
        values, json_params = self.validate(params)
        self.check_params_size(json_params)
        plan = self.build_plan(values)
        params_hash = hashlib.sha256(dumps([self.name, json_params]).encode()).hexdigest()
        run_id = keyed_run_id(self.name, created_by, idempotency_key) if idempotency_key else uuid.uuid4().hex
        canvas, known_steps = compile_plan(plan, run_id=run_id, workflow=self.name, on_failure=self.on_failure)
        record = RunRecord(
            id=run_id,
            workflow=self.name,
            created_by=created_by,
            tags=list(tags or []),
            params=json_params,
            idempotency_key=idempotency_key,
            params_hash=params_hash,
            on_failure=self.on_failure,
            message="queued",
            steps=StepCounts(total=known_steps),
            stages=plan_stages(plan),
            history=[Event(now(), "created", f"run of {self.name} created")],
        )
        preflight(self.name, plan_steps(plan))
        store = get_store()
        try:
            existing = store.create_run(record)
        except RedisError as exc:
            raise StoreUnavailable(f"cannot record the run: the store is unreachable ({exc})") from exc
        if existing is not None:
            if existing.created_by != created_by:  # the creator is part of the id: a match by another is a collision
                raise IdempotencyConflict(
                    f"idempotency key {idempotency_key!r} of {self.name} already names a run of another creator"
                )
            if existing.params_hash != params_hash:
                raise IdempotencyConflict(
                    f"idempotency key {idempotency_key!r} already names run {existing.id} of {self.name} "
                    "with different parameters"
                )
            if existing.status is not RunStatus.PENDING:
                return Run(existing.id)
            # Not started yet: the start that recorded it may have died before enqueuing it (an API process
            # SIGKILLed in between), and nothing else would ever send its messages. Send them (again): a
            # copy of messages already queued is harmless, as a redelivery is (checkpoints, the step lock).
        try:
            canvas.apply_async()
        except (OperationalError, RedisError, OSError) as exc:
            if existing is None:  # an existing run may have its messages queued: the next keyed start sends them
                store.delete_run(run_id)  # nothing half-created: no run without its messages
            raise BrokerUnavailable(f"cannot enqueue run of {self.name}: the broker is unreachable ({exc})") from exc
        except RuntimeError as exc:
            if existing is None:
                store.delete_run(run_id)
            if "Retry limit exceeded" not in str(exc):
                raise
            # Celery's Redis result backend gives up reconnecting with a bare RuntimeError.
            raise BrokerUnavailable(f"cannot enqueue run of {self.name}: the broker is unreachable ({exc})") from exc
        return Run(run_id)


def keyed_run_id(workflow: str, created_by: str | None, idempotency_key: str) -> str:
    """The run id an idempotency key names: one per (workflow, creator, key).

    The creator is part of it, so the same key chosen by two creators names two
    runs: nobody can occupy (or find) another's run, or a scheduled one, by its key.
    """
    parts = [workflow, idempotency_key] if created_by is None else [workflow, created_by, idempotency_key]
    name = "\x00".join(parts)
    return uuid.uuid5(_IDEMPOTENCY_NS, name).hex


def preflight(workflow: str, steps: list[str]) -> None:
    """Before a run is written: Redis and the broker answer now, and the live workers share our settings.

    A broker that is down otherwise costs Celery's reconnect loop (about 20 s of
    retries) and, on the Firestore store, a PENDING run nobody will ever run.
    """
    settings = get_settings()
    try:
        check_agreement(steps)  # only workers serving this plan's steps: other apps' workers are not ours
    except RedisError as exc:
        if settings.broker_url == settings.redis_url:
            raise BrokerUnavailable(f"cannot enqueue run of {workflow}: the broker is unreachable ({exc})") from exc
        raise StoreUnavailable(
            f"cannot start a run of {workflow}: Redis (HAULAGE_REDIS_URL) is unreachable ({exc})"
        ) from exc
    if settings.broker_url != settings.redis_url:
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_CHECK_TIMEOUT)
        except (OperationalError, OSError) as exc:
            raise BrokerUnavailable(f"cannot enqueue run of {workflow}: the broker is unreachable ({exc})") from exc


def _check_meta(workflow: str, created_by: Any, idempotency_key: Any, tags: Any) -> None:
    errors = []
    if created_by is not None and not isinstance(created_by, str):
        errors.append({"field": "created_by", "message": "must be a string", "input": created_by})
    if idempotency_key is not None and (not isinstance(idempotency_key, str) or not idempotency_key):
        errors.append({"field": "idempotency_key", "message": "must be a non-empty string", "input": idempotency_key})
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
        errors.append({"field": "tags", "message": "must be a list of strings", "input": tags})
    if errors:
        raise InvalidParams(workflow, errors)


def workflow(name: str | None = None, *, on_failure: str = "collect", schedule: Any = None,
             schedule_params: dict[str, Any] | None = None, on_complete: str | None = None,
             on_complete_params: FollowUpParams | None = None, max_params_bytes: int | None = None,
             ) -> Callable[[Callable[..., Any]], Workflow]:  # fmt: skip
    """Declare a workflow: a function of validated parameters that returns its plan.

    >>> @workflow("review_plan")
    ... def review_plan(project_id: str, pages: list[int]):
    ...     return chain(extract_pages.s(project_id=project_id, pages=pages),
    ...                  fan_out(analyze_page, kwargs={"project_id": project_id}),
    ...                  compile_report.s(project_id=project_id))

    ``on_failure``: "collect" (default) ends a run whose fan-out items failed
    COMPLETE with the failures listed; "fail" ends it FAILED.
    ``schedule``: a ``celery.schedules.crontab(...)`` or a number of seconds;
    beat then starts a run with ``schedule_params`` on every tick.
    ``on_complete``: the name of a workflow to start when a run ends COMPLETE,
    with the parameters ``on_complete_params(event, results)`` returns.
    ``max_params_bytes``: the largest JSON form of a run's parameters
    (default HAULAGE_MAX_PARAMS_BYTES, 256 KiB); a larger start raises ParamsTooLarge.
    """
    if max_params_bytes is not None and (not isinstance(max_params_bytes, int) or max_params_bytes < 1):
        raise ConfigError(f"workflow {name!r}: max_params_bytes must be a positive number of bytes, "
                          f"got {max_params_bytes!r}")  # fmt: skip
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"workflow {name!r}: on_failure must be one of {', '.join(ON_FAILURE)}, got {on_failure!r}")
    if schedule is not None and not isinstance(schedule, crontab | celery_schedule | int | float):
        raise ConfigError(f"workflow {name!r}: schedule must be a crontab(...) or seconds, got {schedule!r}")
    if isinstance(schedule, int | float) and schedule <= 0:
        raise ConfigError(f"workflow {name!r}: schedule must be more than 0 seconds, got {schedule}")

    def decorate(func: Callable[..., Any]) -> Workflow:
        wf = Workflow(func, name=name or func.__name__, on_failure=on_failure, schedule=schedule,
                      schedule_params=schedule_params, on_complete=on_complete,
                      on_complete_params=on_complete_params, max_params_bytes=max_params_bytes)  # fmt: skip
        if schedule is not None:
            wf.validate(schedule_params or {})  # a schedule that can never start fails at import
        registry.register(wf)
        return wf

    return decorate
