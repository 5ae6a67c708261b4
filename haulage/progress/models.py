"""Records of what users see: runs, steps, checkpoints, and changes to them."""

from __future__ import annotations

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


@dataclass
class RunRecord:
    """The run document: what a frontend shows for one run."""

    id: str
    workflow: str
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

    ``incr`` paths are counters ("steps.done", "cost.<model>.usd"); ``maximum``
    only ever raises a field (progress never runs backwards when two workers
    report out of order); ``events`` are appended to the bounded history.
    """

    set: dict[str, Any] = field(default_factory=dict)
    incr: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def merge(self, other: RunUpdate) -> None:
        self.set.update(other.set)
        for k, v in other.incr.items():
            self.incr[k] = self.incr.get(k, 0) + v
        for k, v in other.maximum.items():
            self.maximum[k] = max(self.maximum.get(k, v), v)
        self.events.extend(other.events)

    def __bool__(self) -> bool:
        return bool(self.set or self.incr or self.maximum or self.events)


COST_FIELDS = ("usd", "input_tokens", "output_tokens", "calls")


def cost_increments(model: str, *, usd: float, input_tokens: int, output_tokens: int, calls: int) -> dict[str, float]:
    return {
        f"cost.{model}.usd": usd,
        f"cost.{model}.input_tokens": input_tokens,
        f"cost.{model}.output_tokens": output_tokens,
        f"cost.{model}.calls": calls,
    }
