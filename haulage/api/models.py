"""The shapes on the wire: request bodies (unknown fields refused) and responses (as the OpenAPI document shows)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from haulage.workflows import RunRecord, RunStatus

Tag = Annotated[str, StringConstraints(min_length=1, max_length=100)]
IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=200)]
#: the longest batch the schema admits; HAULAGE_API_MAX_BATCH sets the real cap (the OpenAPI document shows it)
BATCH_CEILING = 10_000
#: idempotency keys sent over HTTP are stored as "api:<uid>:<key>", apart from every internal key
API_KEY_PREFIX = "api:"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartRun(_Strict):
    """Body of ``POST /v1/workflows/{name}/runs``."""

    params: dict[str, Any] = Field(default_factory=dict, description="the workflow's parameters; see GET /v1/workflows")
    idempotency_key: IdempotencyKey | None = Field(
        None, description="the same key (per user and workflow) returns the same run instead of starting another"
    )
    tags: list[Tag] = Field(default_factory=list, max_length=20, description="labels stored on the run")


class StartBatch(_Strict):
    """Body of ``POST /v1/workflows/{name}/batches``: one run per item."""

    items: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=BATCH_CEILING,
        description="one parameter object per run (at most HAULAGE_API_MAX_BATCH)",
    )
    idempotency_key: IdempotencyKey | None = Field(None, description="item i gets the key '<key>#<i>'")
    tags: list[Tag] = Field(default_factory=list, max_length=20, description="labels stored on every run")


class RunAccepted(BaseModel):
    run_id: str
    status_url: str
    events_url: str
    results_url: str


class BatchRun(BaseModel):
    index: int
    run_id: str


class BatchAccepted(BaseModel):
    batch_id: str = Field(description="also stored on each run as the tag 'batch:<id>'")
    runs: list[BatchRun]


class HistoryEvent(BaseModel):
    at: float
    kind: str
    message: str
    step: str | None = None


class ModelCost(BaseModel):
    usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0


class StepCounts(BaseModel):
    total: int = 0
    done: int = 0
    failed: int = 0


class StageOut(BaseModel):
    """One top-level stage: a step counts 1; a fan-out its item steps (``total`` null until it expands)."""

    name: str
    kind: str
    total: int | None = None
    done: int = 0
    failed: int = 0
    progress: float = 0.0


class RunSummary(BaseModel):
    """A run in a listing: the run document without its parameters, history and result (GET the run for those)."""

    id: str
    workflow: str
    schema_version: int = Field(0, alias="schema", description="version of the document's layout (README)")
    status: RunStatus
    percent: float
    message: str
    stages: list[StageOut] = []
    settled: bool = False
    created_by: str | None = None
    tags: list[str] = []
    idempotency_key: str | None = None
    on_failure: str = "collect"
    cost: dict[str, ModelCost] = {}
    steps: StepCounts = StepCounts()
    error: str | None = None
    heartbeat: float | None = None
    recoveries: int = 0
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def from_record(cls, record: RunRecord) -> RunSummary:
        return cls.model_validate(public_fields(record))


class RunDocument(RunSummary):
    """The run document: what a progress bar shows (times are Unix seconds)."""

    params: dict[str, Any] = {}
    history: list[HistoryEvent] = []
    failures: list[FailureOut] = []
    result: Any = None

    @classmethod
    def from_record(cls, record: RunRecord) -> RunDocument:
        return cls.model_validate(public_fields(record))  # internal fields (params_hash) are dropped


def public_fields(record: RunRecord) -> dict[str, Any]:
    """The record as end users may see it.

    The API's own namespace is taken off the idempotency key, and operator
    details (full Cloud Run execution names with project and region, server
    log paths) are cut out of the history and errors: the service log has them.
    """
    data = record.to_dict()
    key = data.get("idempotency_key")
    if isinstance(key, str) and key.startswith(API_KEY_PREFIX):
        data["idempotency_key"] = key.split(":", 2)[-1]
    for event in data.get("history") or []:
        if isinstance(event, dict) and isinstance(event.get("message"), str):
            event["message"] = redact(event["message"])
    if isinstance(data.get("error"), str):
        data["error"] = redact(data["error"])
    for failure in data.get("failures") or []:  # the run's list of failed steps, as the result's below
        if isinstance(failure, dict) and isinstance(failure.get("message"), str):
            failure["message"] = redact(failure["message"])
    result = data.get("result")
    if isinstance(result, dict) and isinstance(result.get("failures"), list):
        for failure in result["failures"]:
            if isinstance(failure, dict) and isinstance(failure.get("message"), str):
                failure["message"] = redact(failure["message"])
    return data


_EXECUTION = re.compile(r"projects/[^/\s]+/locations/[^/\s]+/jobs/[^/\s]+/executions/([A-Za-z0-9_-]+)")
_LOG_PATH = re.compile(r"\blog(?:_uri)?: ?\S+")


def redact(text: str) -> str:
    """``text`` without full execution names (their last part stays) and log locations."""
    return _LOG_PATH.sub("log: see the service log", _EXECUTION.sub(r"execution \1", text))


class RunPage(BaseModel):
    runs: list[RunSummary]
    limit: int
    offset: int
    next_offset: int | None = Field(description="pass as offset for the next page; null on the last page "
                                    "(offsets stop at 10000: page with next_cursor)")  # fmt: skip
    next_cursor: str | None = Field(None, description="pass as cursor for the next page; null on the last page")


class FailureOut(BaseModel):
    params: dict[str, Any] = Field(description="the parameters the failed item was given")
    error_type: str
    message: str
    step: str | None = None
    index: int | None = Field(None, description="the fan-out item's index")
    label: str | None = None


class StepOut(BaseModel):
    """One step document: a fan-out item's row (QUEUED from its expansion), or a chain step."""

    key: str
    name: str
    status: str
    stage: int | None = None
    index: int | None = None
    label: str | None = None
    attempt: int = 1
    percent: float = 0.0
    message: str = ""
    backend: str = "local"
    error_type: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None


class StepList(BaseModel):
    run_id: str
    steps: list[StepOut]


class RunResults(BaseModel):
    """A finished run's outcome. After a final fan-out, ``successes`` and ``failures``; else ``value``."""

    run_id: str
    status: RunStatus
    value: Any = None
    successes: list[Any] | None = None
    failures: list[FailureOut] = []
    error: str | None = None


class CancelOutcome(BaseModel):
    run_id: str
    cancelled: bool = Field(description="true if this call cancelled the run; false if it had already ended")
    status: RunStatus


class WorkflowInfo(BaseModel):
    name: str
    description: str | None = None
    on_failure: str
    parameters: dict[str, Any] = Field(description="JSON Schema of the parameters")


class WorkflowList(BaseModel):
    workflows: list[WorkflowInfo]


class Me(BaseModel):
    id: str
    email: str | None = None
    admin: bool
    roles: dict[str, str]
    auth: str = Field(description="the authentication mode: dev or firebase")


class FieldError(BaseModel):
    field: str = Field(description="dotted path in the request, e.g. params.pages.2 or items.3.country")
    message: str
    input: Any = None


class ErrorDetail(BaseModel):
    type: str
    message: str
    fields: list[FieldError] = []


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


#: the error answers every /v1 route may give, for the OpenAPI document
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed request (not JSON, bad framing)",
        401: "missing, invalid or expired token; or authentication not configured",
        403: "the user may not do this",
        404: "no such workflow or run (another user's run is not found either)",
        405: "method not allowed (also when an encoded '/' in a path parameter makes it another route's path)",
        409: "conflict: idempotency key reused with other parameters, or the run has not finished / was cancelled",
        413: "request body too large",
        415: "request body is not application/json",
        422: "invalid fields, named in error.fields",
        503: "Redis, the broker or the token issuer is unreachable; retry",
    }.items()
}
