"""What a stage after a fan-out receives: the successes and the failures, never one lost to another."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Failure:
    """One fan-out item that failed after its retries, with the parameters it was given."""

    params: dict[str, Any]
    error_type: str
    message: str
    step: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Failure:
        return cls(
            params=data.get("params") or {},
            error_type=data["error_type"],
            message=data["message"],
            step=data.get("step"),
        )


@dataclass
class Results:
    """The outcome of a fan-out: ``successes`` in item order, and ``failures``.

    >>> r = Results(successes=[1, 2], failures=[])
    >>> r.ok, len(r)
    (True, 2)
    """

    successes: list[Any] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __len__(self) -> int:
        return len(self.successes) + len(self.failures)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.successes)

    def to_dict(self) -> dict[str, Any]:
        return {"successes": list(self.successes), "failures": [f.to_dict() for f in self.failures]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        return cls(
            successes=list(data.get("successes", [])),
            failures=[Failure.from_dict(f) for f in data.get("failures", [])],
        )

    @staticmethod
    def is_results(data: Any) -> bool:
        return isinstance(data, dict) and set(data) == {"successes", "failures"}
