"""Plans: what a workflow function returns (``chain`` of steps and ``fan_out`` stages).

A plan is data. ``compile_plan`` turns it into a Celery canvas in which every
node has a deterministic step key taken from its position (``1:analyze_page[17]``),
so that replaying the same plan finds the same checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from celery import chain as celery_chain
from celery.canvas import Signature

from haulage.dispatch.dispatcher import signature_for
from haulage.errors import PlanError
from haulage.jsonutil import check_serializable
from haulage.progress.models import StageCounts, StageKind
from haulage.tasks.definition import Step, StepCall
from haulage.tasks.flow import Flow, InputKind
from haulage.workflows.fanout import expand_fan_out
from haulage.workflows.finish import finish_run


@dataclass(frozen=True)
class FanOut:
    """One stage that runs ``steps`` (one step, or a chain of steps) once per item, in parallel."""

    steps: tuple[StepCall, ...]
    items: list[dict[str, Any]] | None  #: None: take the items from the previous stage's output
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  #: a template for each item's label ("page {page}"); default: its parameters


@dataclass(frozen=True)
class Chain:
    """Stages run one after another; each receives the previous one's output."""

    stages: tuple[StepCall | FanOut, ...]


Node = StepCall | FanOut | Chain | Step


def plan_steps(plan: Chain) -> list[str]:
    """The names of the steps a plan runs (what a worker must serve for the run to move)."""
    calls = [c for stage in plan.stages for c in (stage.steps if isinstance(stage, FanOut) else (stage,))]
    return sorted({c.step.name for c in calls})


def _as_call(node: Any, where: str) -> StepCall:
    if isinstance(node, Step):
        return StepCall(node, {})
    if isinstance(node, StepCall):
        return node
    raise PlanError(f"{where}: expected a step or step.s(...), got {type(node).__name__}: {node!r}")


def chain(*stages: Node) -> Chain:
    """Run stages in order: ``chain(a.s(x=1), fan_out(b), c.s())``. Nested chains are flattened."""
    if not stages:
        raise PlanError("chain() needs at least one stage")
    flat: list[StepCall | FanOut] = []
    for n, stage in enumerate(stages):
        if isinstance(stage, Chain):
            flat.extend(stage.stages)
        elif isinstance(stage, FanOut):
            flat.append(stage)
        else:
            flat.append(_as_call(stage, f"chain stage {n}"))
    return Chain(tuple(flat))


def fan_out(target: Step | StepCall | Chain, items: list[dict[str, Any]] | None = None, *,
            kwargs: dict[str, Any] | None = None, label: str | None = None) -> FanOut:  # fmt: skip
    """Run ``target`` once per item, in parallel; the next stage receives ``Results``.

    ``items``: a list of keyword-argument dicts; without it, the items are the
    list the previous stage returned. ``kwargs`` are passed to every item
    (an item's own keys win). ``target`` may be a chain of steps: each item
    runs the whole chain, the first step getting the item's arguments.
    ``label``: what a UI shows for each item, a template formatted with the
    item's parameters (``label="page {page}"``); by default the parameters, short.
    """
    if label is not None and not isinstance(label, str):
        raise PlanError(f"fan_out label must be a template string such as 'page {{page}}', got {label!r}")
    if isinstance(target, Chain):
        subs = []
        for n, stage in enumerate(target.stages):
            if isinstance(stage, FanOut):
                raise PlanError("fan_out over a chain that itself fans out is not supported; flatten the plan")
            subs.append(_as_call(stage, f"fan_out chain stage {n}"))
        steps = tuple(subs)
    else:
        steps = (_as_call(target, "fan_out target"),)
    if items is not None:
        if not isinstance(items, list):
            raise PlanError(f"fan_out items must be a list of dicts, got {type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise PlanError(f"fan_out item {i} must be a dict of parameters, got {type(item).__name__}")
            reason = check_serializable(item)
            if reason:
                raise PlanError(f"fan_out item {i} is not JSON-serialisable: {reason}")
    fixed = dict(kwargs or {})
    reason = check_serializable(fixed)
    if reason:
        raise PlanError(f"fan_out kwargs are not JSON-serialisable: {reason}")
    return FanOut(steps, None if items is None else list(items), fixed, label)


def plan_stages(plan: Chain) -> list[StageCounts]:
    """The run document's ``stages`` before anything runs: a step counts one; a fan-out its item steps when
    its items are given, else None until it expands."""
    out = []
    for stage in plan.stages:
        if isinstance(stage, StepCall):
            out.append(StageCounts(name=stage.step.name, kind=StageKind.STEP.value, total=1))
        else:
            total = None if stage.items is None else len(stage.items) * len(stage.steps)
            out.append(StageCounts(name=stage.steps[0].step.name, kind=StageKind.FAN_OUT.value, total=total))
    return out


def as_plan(value: Any, workflow: str) -> Chain:
    """What a workflow function returned, as a Chain."""
    if isinstance(value, Chain):
        return value
    if isinstance(value, (Step, StepCall, FanOut)):
        return chain(value)
    raise PlanError(f"workflow {workflow!r} must return chain(...), fan_out(...) or a step, got {type(value).__name__}")


def compile_plan(plan: Chain, *, run_id: str, workflow: str, on_failure: str) -> tuple[Signature, int]:
    """The Celery canvas that runs ``plan`` for ``run_id``, and the number of steps known before it runs.

    Raises PlanError, naming the stage, for anything that would fail later.
    """
    stages = plan.stages
    count = len(stages)
    sigs: list[Signature] = []
    known = 0
    for i, stage in enumerate(stages):
        kind: InputKind = "none" if i == 0 else ("results" if isinstance(stages[i - 1], FanOut) else "value")
        flow: Flow = {"workflow": workflow, "stage": i, "stages": count, "item": None, "units": 1,
                      "input": kind, "on_failure": on_failure, "attempt": 1}  # fmt: skip
        if isinstance(stage, StepCall):
            step = stage.step
            step.check_kwargs(stage.kwargs, takes_input=i > 0, where=f"stage {i}")
            key = f"{i}:{step.name}"
            sigs.append(signature_for(step, run_id=run_id, key=key, params=stage.kwargs, flow=flow))
            known += 1
            continue
        if stage.items is None and i == 0:
            raise PlanError("the first stage cannot fan out over the previous stage's output: there is none")
        first = stage.steps[0]
        if stage.items is None:
            first.step.check_kwargs({**first.kwargs, **stage.kwargs}, takes_input=None, where=f"stage {i}")
        for n, item in enumerate(stage.items or []):
            first.step.check_kwargs({**first.kwargs, **stage.kwargs, **item}, takes_input=False,
                                    where=f"stage {i}, item {n}")  # fmt: skip
        for n, sub in enumerate(stage.steps[1:], start=1):
            sub.step.check_kwargs(sub.kwargs, takes_input=True, where=f"stage {i}, chained step {n}")
        spec = {
            "steps": [{"step": s.step.name, "params": s.kwargs} for s in stage.steps],
            "items": stage.items,
            "kwargs": stage.kwargs,
            "label": stage.label,
        }
        sigs.append(expand_fan_out.s(run_id=run_id, key=f"{i}:fan_out", spec=spec, flow=flow).set(queue="short"))
    end_flow: Flow = {"workflow": workflow, "stage": count, "stages": count, "item": None, "units": 1,
                      "input": "results" if isinstance(stages[-1], FanOut) else "value",
                      "on_failure": on_failure, "attempt": 1}  # fmt: skip
    sigs.append(finish_run.s(run_id=run_id, flow=end_flow).set(queue="short"))
    return celery_chain(*sigs), known
