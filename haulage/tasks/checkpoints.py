"""Checkpoints as a step sees them: the ones its input comes from, and the name check on replay.

A step's checkpoint is written once, create-if-absent, under (run_id, step_key)
(``Store.complete_step``). Replaying a plan finds it again by the same key; the
step name stored with it must match the step now at that position, or the
plan changed under a run in flight.
"""

from __future__ import annotations

from typing import Any

from haulage.errors import MissingCheckpoint, NondeterminismError
from haulage.progress.models import Checkpoint
from haulage.tasks.flow import Flow
from haulage.tasks.results import Failure, Results


def input_keys(flow: Flow, prev: Any) -> list[str]:
    """The checkpoint keys this step's input comes from."""
    if flow["input"] == "value" and isinstance(prev, dict) and prev.get("ok") == 1:
        return [prev["k"]]
    if flow["input"] == "results" and isinstance(prev, list):
        # A failed item's parameters are a checkpoint of their own (see flow.failure_ref).
        return [r["k"] if r.get("ok") == 1 else r["pk"] for r in prev
                if isinstance(r, dict) and (r.get("ok") == 1 or "pk" in r)]  # fmt: skip
    return []


def build_input(flow: Flow, prev: Any, cps: dict[str, Checkpoint]) -> tuple[list[Any], Results | None]:
    """The positional input for the step, and the fan-out Results when that is what it gets."""
    if flow["input"] == "none":
        return [], None
    if flow["input"] == "value":
        cp = cps.get(prev["k"]) if isinstance(prev, dict) else None
        if cp is None:
            raise MissingCheckpoint(f"the checkpoint of the previous step {prev!r} is missing")
        return [cp.value], None
    refs = sorted((r for r in prev or [] if isinstance(r, dict)), key=lambda r: r.get("i") or 0)
    successes, failures = [], []
    for ref in refs:
        if ref.get("ok") == 1:
            cp = cps.get(ref["k"])
            if cp is None:
                raise MissingCheckpoint(f"the checkpoint of fan-out step {ref['k']!r} is missing")
            successes.append(cp.value)
        elif "error_type" in ref:
            kept = cps.get(ref["pk"]) if "pk" in ref else None
            # A ref with "params" in it was written before the store kept them (a run in flight across an upgrade).
            params = kept.value if kept is not None else ref.get("params")
            failures.append(Failure(params or {}, ref["error_type"], ref["message"], ref["k"]))
    results = Results(successes, failures)
    return [results], results


def check_name(cp: Checkpoint, name: str, key: str) -> None:
    """Raise NondeterminismError if ``cp`` was written by another step than ``name``."""
    if cp.name != name:
        raise NondeterminismError(
            f"step {key!r} was checkpointed by {cp.name!r} but is now {name!r}; "
            "the workflow's plan changed while this run was in flight: check that it is deterministic"
        )
