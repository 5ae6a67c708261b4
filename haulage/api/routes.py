"""The /v1 routes: start runs and batches, read, list, cancel and collect runs, list workflows.

Thin: each handler checks who may do what and calls the public ``workflows``
API; errors propagate to the one mapping in api/errors.py.
"""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from redis.exceptions import RedisError

from haulage.api.auth import User
from haulage.api.deps import Context, CurrentUser, VisibleRun, scoped_key
from haulage.api.errors import Forbidden, Unprocessable
from haulage.api.models import (
    ERROR_RESPONSES,
    BatchAccepted,
    BatchRun,
    CancelOutcome,
    FailureOut,
    Me,
    RunAccepted,
    RunDocument,
    RunPage,
    RunResults,
    RunSummary,
    StartBatch,
    StartRun,
    StepList,
    StepOut,
    WorkflowInfo,
    WorkflowList,
    public_fields,
    redact,
)
from haulage.api.params import validate_params
from haulage.errors import InvalidParams, RunFailed
from haulage.workflows import Results, Run, RunStatus, Workflow, cancel_run, list_runs, run_cursor
from haulage.workflows.run import MAX_OFFSET

log = logging.getLogger("haulage.api")

#: most field errors reported for one batch (the first ones, in item order)
MAX_BATCH_ERRORS = 50
MAX_PAGE = 200

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


def _authorize(ctx: Context, user: User, wf: Workflow, params: dict[str, Any], where: str = "") -> None:
    if not ctx.authorizer(user, wf.name, params):
        project = params.get("project_id")
        scope = f" for project {project!r}" if isinstance(project, str) else ""
        raise Forbidden(f"{where}user {user.id!r} may not start workflow {wf.name!r}{scope}")


def _accepted(run_id: str) -> RunAccepted:
    base = f"/v1/runs/{run_id}"
    return RunAccepted(run_id=run_id, status_url=base, events_url=f"{base}/events", results_url=f"{base}/results")


@router.get("/me", response_model=Me, summary="Who the token belongs to")
def me(user: CurrentUser, ctx: Context) -> Me:
    return Me(id=user.id, email=user.email, admin=user.admin, roles=dict(user.roles), auth=ctx.authenticator.mode)


@router.get("/openapi.json", summary="This service's OpenAPI document (as /openapi.json where docs are on)")
def openapi_document(user: CurrentUser, request: Request) -> dict[str, Any]:
    """Behind the token like ``/v1/workflows``: it names the same workflows and parameter schemas."""
    document: dict[str, Any] = request.app.openapi()
    return document


@router.get("/workflows", response_model=WorkflowList, summary="Workflows this service starts, with parameter schemas")
def workflows(user: CurrentUser, ctx: Context) -> WorkflowList:
    return WorkflowList(
        workflows=[
            WorkflowInfo(name=wf.name, description=(wf.__doc__ or "").strip() or None, on_failure=wf.on_failure,
                         parameters=wf.parameters_schema())  # fmt: skip
            for wf in ctx.workflows.values()
        ]
    )


@router.post("/workflows/{name}/runs", status_code=202, response_model=RunAccepted, summary="Start a run")
def start_run(name: str, body: StartRun, user: CurrentUser, ctx: Context, response: Response) -> RunAccepted:
    """Validate the parameters, check the caller may start this workflow, record and enqueue the run.

    Returns at once with the run id; follow it at ``events_url``.
    """
    wf = ctx.workflow(name)
    json_params = validate_params(wf, body.params, "params")
    _authorize(ctx, user, wf, json_params)
    run = wf.start(**body.params, created_by=user.id, idempotency_key=scoped_key(user, body.idempotency_key),
                   tags=list(body.tags))  # fmt: skip
    log.info("run %s of %s started by %s", run.id, wf.name, user.id)
    response.headers["Location"] = f"/v1/runs/{run.id}"
    return _accepted(run.id)


@router.post("/workflows/{name}/batches", status_code=202, response_model=BatchAccepted, summary="One run per item")
def start_batch(name: str, body: StartBatch, user: CurrentUser, ctx: Context) -> BatchAccepted:
    """Start one run of the workflow per parameter object.

    Every item is validated and authorised before any run is created: one bad
    item refuses the whole batch (each error names ``items.<i>.<field>``).
    """
    if len(body.items) > ctx.settings.max_batch:
        raise Unprocessable(
            f"a batch holds at most {ctx.settings.max_batch} items, got {len(body.items)}",
            fields=[{"field": "items", "message": f"at most {ctx.settings.max_batch} items, got {len(body.items)}"}],
        )
    wf = ctx.workflow(name)
    validated: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for i, item in enumerate(body.items):
        try:
            validated.append(validate_params(wf, item, f"items.{i}"))
        except InvalidParams as exc:
            problems.extend(exc.errors)
    if problems:
        raise InvalidParams(wf.name, problems[:MAX_BATCH_ERRORS])
    for i, params in enumerate(validated):
        _authorize(ctx, user, wf, params, where=f"items.{i}: ")
    key = scoped_key(user, body.idempotency_key)
    batch_id = uuid.uuid5(uuid.NAMESPACE_URL, f"haulage-batch:{wf.name}:{key}").hex if key else uuid.uuid4().hex
    tags = [*body.tags, f"batch:{batch_id}"]
    started: list[Run] = []
    try:
        for i, item in enumerate(body.items):
            started.append(wf.start(**item, created_by=user.id, tags=tags,
                                    idempotency_key=f"{key}#{i}" if key else None))  # fmt: skip
    except BaseException:
        # Infrastructure failed part-way: the runs already started are cancelled, not left half a batch.
        _cancel_quietly(started)
        raise
    log.info("batch %s of %s: %d run(s) started by %s", batch_id, wf.name, len(started), user.id)
    return BatchAccepted(batch_id=batch_id, runs=[BatchRun(index=i, run_id=r.id) for i, r in enumerate(started)])


def _cancel_quietly(runs: list[Run]) -> None:
    for run in runs:
        try:
            cancel_run(run.id)
        except (RedisError, OSError) as exc:  # the store is likely what failed; say so and go on
            log.warning("could not cancel run %s of a failed batch: %s", run.id, exc)


@router.get("/runs", response_model=RunPage, summary="List runs, newest first")
def runs(
    user: CurrentUser,
    workflow: Annotated[str | None, Query(max_length=200)] = None,
    status: RunStatus | None = None,
    created_by: Annotated[str | None, Query(max_length=200, description="admins only, for other users")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
) -> RunPage:
    """Your runs (an admin sees everyone's, or one user's with ``created_by``), without their parameters.

    Page with ``cursor`` (each page returns ``next_cursor``); ``offset`` stops at 10,000.
    """
    if not user.admin:
        if created_by not in (None, user.id):
            raise Forbidden("only admins may list other users' runs")
        created_by = user.id
    # One more than asked tells whether there is a next page.
    records = list_runs(workflow=workflow, status=status, created_by=created_by, limit=limit + 1, offset=offset,
                        cursor=cursor)  # fmt: skip
    more = len(records) > limit
    shown = records[:limit]
    return RunPage(
        runs=[RunSummary.from_record(r) for r in shown],
        limit=limit,
        offset=offset,
        next_offset=offset + limit if more and offset + limit <= MAX_OFFSET and cursor is None else None,
        next_cursor=run_cursor(shown[-1]) if more else None,
    )


@router.get("/runs/{run_id}", response_model=RunDocument, summary="A run's document")
def run_document(record: VisibleRun) -> RunDocument:
    return RunDocument.from_record(record)


@router.get("/runs/{run_id}/results", response_model=RunResults, summary="A finished run's results")
def run_results(record: VisibleRun) -> RunResults:
    """COMPLETE: the final value, or successes and failures (with their parameters) after a final fan-out.

    FAILED: the error and the failed items; 409 while the run is still going or when it was cancelled.
    """
    try:
        value = Run(record.id).results()
    except RunFailed as exc:
        return RunResults(run_id=record.id, status=RunStatus.FAILED, error=exc.error,
                          failures=[FailureOut(**f.to_dict()) for f in exc.failures])  # fmt: skip
    if isinstance(value, Results):
        return RunResults(run_id=record.id, status=RunStatus.COMPLETE, successes=list(value.successes),
                          failures=[FailureOut(**f.to_dict()) for f in value.failures])  # fmt: skip
    # A stage after the fan-out reduced it: the run document still lists the items that failed.
    listed = public_fields(record).get("failures") or []
    return RunResults(run_id=record.id, status=RunStatus.COMPLETE, value=value,
                      failures=[FailureOut.model_validate(f) for f in listed])  # fmt: skip


@router.get("/runs/{run_id}/steps", response_model=StepList, summary="A run's step documents (per-item rows)")
def run_steps(record: VisibleRun) -> StepList:
    """Every step of the run: chain steps, and each fan-out item's row (QUEUED from its expansion)."""
    steps = Run(record.id).steps()
    rows = [StepOut.model_validate({**s.to_dict(), "error": redact(s.error) if s.error else None}) for s in steps]
    rows.sort(key=lambda r: (r.stage if r.stage is not None else -1, r.index if r.index is not None else -1, r.key))
    return StepList(run_id=record.id, steps=rows)


@router.post("/runs/{run_id}/cancel", response_model=CancelOutcome, summary="Cancel a run")
def cancel(record: VisibleRun, user: CurrentUser) -> CancelOutcome:
    cancelled = cancel_run(record.id)
    if cancelled:
        log.info("run %s cancelled by %s", record.id, user.id)
    return CancelOutcome(run_id=record.id, cancelled=cancelled, status=Run(record.id).status().status)
