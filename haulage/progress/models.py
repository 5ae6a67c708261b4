"""Records of what users see: runs, steps, checkpoints, and changes to them."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class RunStatus(StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({RunStatus.COMPLETE, RunStatus.FAILED, RunStatus.CANCELLED})
ACTIVE = frozenset({RunStatus.PENDING, RunStatus.PROCESSING})


class StepStatus(StrEnum):
    QUEUED = "QUEUED"  #: waiting in a queue, or waiting out a retry backoff
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"  #: the run was cancelled while this step ran


def now() -> float:
    return time.time()


@dataclass
class Event:
    """One timestamped line of a run's history."""

    at: float
    kind: str
    message: str
    step: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        return cls(at=float(data["at"]), kind=data["kind"], message=data["message"], step=data.get("step"))


@dataclass
class Cost:
    usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0


@dataclass
class StepCounts:
    total: int = 0
    done: int = 0
    failed: int = 0


#: the version of the run and step documents' layout (README "Progress: run documents, live",
#: deploy/haulage-documents.d.ts); a frontend checks it before reading the rest
SCHEMA_VERSION = 1
#: the percent a run shows at most until it is COMPLETE: 100 means finished, nothing less
PERCENT_BEFORE_COMPLETE = 99.0
#: failed items listed on a run document (the first ones; ``steps.failed`` counts them all)
FAILURES_LIMIT = 100


class StageKind(StrEnum):
    STEP = "step"
    FAN_OUT = "fan_out"


@dataclass
class StageCounts:
    """One top-level stage of the plan: its steps' counts, and the progress its one step reported.

    ``total`` is None for a fan-out not yet expanded (its items are not known);
    a fan-out's counts are its item steps (items x steps per item).
    """

    name: str
    kind: str = StageKind.STEP.value
    total: int | None = 1
    done: int = 0
    failed: int = 0
    progress: float = 0.0  #: 0-100, what ctx.progress last reported in a stage of one step

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageCounts:
        total = data.get("total")
        return cls(name=str(data.get("name") or ""), kind=str(data.get("kind") or StageKind.STEP.value),
                   total=None if total is None else int(total), done=int(data.get("done") or 0),
                   failed=int(data.get("failed") or 0), progress=float(data.get("progress") or 0.0))  # fmt: skip


def work_percent(stages: list[StageCounts]) -> float:
    """The run's percent weighted by work: each step counts one unit, a fan-out one per item step.

    A fan-out not yet expanded counts as one unit until its items are known; a
    stage of one step counts what its ``ctx.progress`` reported. Capped at
    PERCENT_BEFORE_COMPLETE: 100 is written only with COMPLETE. Stores keep
    the maximum of this and what the document showed, so it never runs backwards.
    """
    total = done = 0.0
    for stage in stages:
        if stage.total is None:
            total += 1
            continue
        units = max(stage.total, 0)
        finished = min(stage.done + stage.failed, units)
        total += units
        done += finished
        if stage.kind == StageKind.STEP.value and finished < units:
            done += (units - finished) * max(0.0, min(stage.progress, 100.0)) / 100.0
    if total <= 0:
        return 0.0
    return min(PERCENT_BEFORE_COMPLETE, math.floor(1000.0 * done / total) / 10.0)


def stage_message(stage: StageCounts) -> str:
    """The run's default message while a fan-out stage runs: "analyze_page 12/40" (finished of total)."""
    total = "?" if stage.total is None else str(stage.total)
    return f"{stage.name} {stage.done + stage.failed}/{total}"


#: the stage fields whose change on a fan-out stage rewrites the run's message (:func:`stage_message`)
COUNT_FIELDS = ("total", "done", "failed")


def round_usd(value: float) -> float:
    """Money without float noise: dollars to the nano-dollar (0.0016379999999999997 -> 0.001638)."""
    return round(float(value), 9)


@dataclass
class FailureEntry:
    """One failed step as a run document lists it: which item, with what parameters, and why."""

    step: str
    name: str
    error_type: str
    message: str
    index: int | None = None  #: the fan-out item's index
    label: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    stage: int | None = None
    at: float = field(default_factory=lambda: time.time())

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FailureEntry:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["at"] = float(known.get("at") or 0.0)
        return cls(**known)


@dataclass
class RunRecord:
    """The run document: what a frontend shows for one run."""

    id: str
    workflow: str
    schema: int = SCHEMA_VERSION
    status: RunStatus = RunStatus.PENDING
    percent: float = 0.0
    message: str = ""
    created_by: str | None = None
    tags: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    params_hash: str = ""
    on_failure: str = "collect"
    history: list[Event] = field(default_factory=list)
    cost: dict[str, Cost] = field(default_factory=dict)
    steps: StepCounts = field(default_factory=StepCounts)
    stages: list[StageCounts] = field(default_factory=list)
    failures: list[FailureEntry] = field(default_factory=list)  #: the first FAILURES_LIMIT failed steps
    settled: bool = False  #: set once after the run ended, when the steps in flight at the end have landed
    result: Any = None  #: a summary: the final value, or counts and failures for a fan-out
    error: str | None = None
    heartbeat: float | None = None
    recoveries: int = 0
    created_at: float = field(default_factory=now)
    updated_at: float = field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data


def stage_fields(stages: list[StageCounts]) -> dict[str, Any]:
    """Stages as flat hash fields ("stages.n", "stages.<i>.<field>"): how the Redis store and its twin keep them."""
    out: dict[str, Any] = {"stages.n": len(stages)}
    for i, stage in enumerate(stages):
        for k, v in stage.to_dict().items():
            out[f"stages.{i}.{k}"] = v
    return out


def stages_from_fields(flat: dict[str, Any]) -> list[StageCounts]:
    """The inverse of :func:`stage_fields` (values already decoded)."""
    count = int(float(flat.get("stages.n") or 0))
    out = []
    for i in range(count):
        prefix = f"stages.{i}."
        out.append(StageCounts.from_dict({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}))
    return out


@dataclass
class StepRecord:
    """Where one step of a run stands (``steps`` subcollection / hash)."""

    key: str
    name: str
    status: StepStatus
    attempt: int = 1
    percent: float = 0.0
    message: str = ""
    backend: str = "local"
    task_id: str | None = None
    error_type: str | None = None
    error: str | None = None
    retry_at: float | None = None
    execution: str | None = None  #: a Cloud Run execution name, when dispatched there
    updated_at: float = field(default_factory=now)
    stage: int | None = None  #: the top-level stage it belongs to
    index: int | None = None  #: the fan-out item's index (None outside a fan-out)
    label: str | None = None  #: what a UI shows for the item: fan_out(label=...), else its parameters, short
    started_at: float | None = None  #: when the attempt now recorded started
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)  # shallow: asdict's deep copy costs more than the rest of a short step
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["status"] = StepStatus(known["status"])
        return cls(**known)


@dataclass
class Checkpoint:
    """A step's recorded output; written once, returned on every replay."""

    step_key: str
    name: str
    value: Any
    attempt: int = 1
    created_at: float = field(default_factory=now)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(
            step_key=data["step_key"],
            name=data["name"],
            value=data.get("value"),
            attempt=int(data.get("attempt", 1)),
            created_at=float(data.get("created_at", 0.0)),
        )


@dataclass
class RunUpdate:
    """A change to a run document, applied as one write.

    ``incr`` paths are counters ("steps.done", "stages.1.done", "cost.<model>.usd");
    ``maximum`` only ever raises a field (progress never runs backwards when two
    workers report out of order); ``events`` are appended to the bounded history,
    ``failures`` to the run's list of failed steps (its first FAILURES_LIMIT).

    Every store derives ``percent`` from the stages on each write
    (:func:`work_percent`), and applies nothing to a run that has ended but its
    ``settled`` marker: a terminal document stays as it was written.
    """

    set: dict[str, Any] = field(default_factory=dict)
    incr: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    failures: list[FailureEntry] = field(default_factory=list)

    def merge(self, other: RunUpdate) -> None:
        self.set.update(other.set)
        for k, v in other.incr.items():
            self.incr[k] = self.incr.get(k, 0) + v
        for k, v in other.maximum.items():
            self.maximum[k] = max(self.maximum.get(k, v), v)
        self.events.extend(other.events)
        self.failures.extend(other.failures)

    def __bool__(self) -> bool:
        return bool(self.set or self.incr or self.maximum or self.events or self.failures)


COST_FIELDS = ("usd", "input_tokens", "output_tokens", "calls")


def cost_increments(model: str, *, usd: float, input_tokens: int, output_tokens: int, calls: int) -> dict[str, float]:
    return {
        f"cost.{model}.usd": usd,
        f"cost.{model}.input_tokens": input_tokens,
        f"cost.{model}.output_tokens": output_tokens,
        f"cost.{model}.calls": calls,
    }
