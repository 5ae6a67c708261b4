"""The shapes on the wire: request bodies (unknown fields refused) and responses (as the OpenAPI document shows)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from haulage.workflows import RunRecord, RunStatus

Tag = Annotated[str, StringConstraints(min_length=1, max_length=100)]
IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=200)]
#: the longest batch the schema admits; HAULAGE_API_MAX_BATCH sets the real cap (the OpenAPI document shows it)
BATCH_CEILING = 10_000


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


class RunDocument(BaseModel):
    """The run document: what a progress bar shows (times are Unix seconds)."""

    id: str
    workflow: str
    status: RunStatus
    percent: float
    message: str
    created_by: str | None = None
    tags: list[str] = []
    params: dict[str, Any] = {}
    idempotency_key: str | None = None
    on_failure: str = "collect"
    history: list[HistoryEvent] = []
    cost: dict[str, ModelCost] = {}
    steps: StepCounts = StepCounts()
    result: Any = None
    error: str | None = None
    heartbeat: float | None = None
    recoveries: int = 0
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def from_record(cls, record: RunRecord) -> RunDocument:
        return cls.model_validate(record.to_dict())  # internal fields (params_hash) are dropped


class RunPage(BaseModel):
    runs: list[RunDocument]
    limit: int
    offset: int
    next_offset: int | None = Field(description="pass as offset for the next page; null on the last page")


class FailureOut(BaseModel):
    params: dict[str, Any] = Field(description="the parameters the failed item was given")
    error_type: str
    message: str
    step: str | None = None


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
