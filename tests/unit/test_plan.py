"""Plans, compiled without a broker: the canvas a workflow's plan becomes, and the errors a bad plan gives.

What a user sees through these: every node of a plan gets a step key from its
position (so a resumed run finds its checkpoints), each stage is told what it
receives from the one before, and a plan that could only fail later fails
when it is built, with a message naming the stage, the step and the parameter.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery.canvas import Signature

from haulage.errors import PlanError
from haulage.tasks import Results, StepContext, step
from haulage.workflows.fanout import item_key
from haulage.workflows.plan import as_plan, chain, compile_plan, fan_out

pytestmark = pytest.mark.timeout(30)


@step(name="unit_plan_extract")
def extract(ctx: StepContext, project_id: str) -> list[dict[str, Any]]:
    return [{"page": 1}]


@step(name="unit_plan_analyze")
def analyze(ctx: StepContext, page: int, project_id: str = "") -> dict[str, Any]:
    return {"page": page}


@step(name="unit_plan_report")
def report(ctx: StepContext, results: Results, title: str = "") -> int:
    return len(results)


@step(name="unit_plan_refine")
def refine(ctx: StepContext, analysis: dict[str, Any]) -> dict[str, Any]:
    return analysis


@step(name="unit_plan_no_input")
def no_input(ctx: StepContext, *, label: str = "") -> str:
    return label


def nodes(plan: Any, **options: Any) -> list[Signature]:
    canvas, _ = compile_plan(plan, run_id="run-1", workflow="review", on_failure="collect", **options)
    return list(canvas.tasks)


def test_a_chain_compiles_to_its_stages_then_the_finish_task() -> None:
    plan = chain(extract.s(project_id="p1"), fan_out(analyze, kwargs={"project_id": "p1"}), report.s(title="t"))
    canvas, known = compile_plan(plan, run_id="run-1", workflow="review", on_failure="fail")
    sigs = list(canvas.tasks)

    assert [s.task for s in sigs] == ["unit_plan_extract", "haulage.fan_out", "unit_plan_report", "haulage.finish"]
    assert [s.kwargs.get("key") for s in sigs[:3]] == ["0:unit_plan_extract", "1:fan_out", "2:unit_plan_report"]
    assert known == 2  # the fan-out's items are counted when it expands
    assert all(s.kwargs["run_id"] == "run-1" for s in sigs)
    flows = [s.kwargs["flow"] for s in sigs]
    assert [f["input"] for f in flows] == ["none", "value", "results", "value"]
    assert [f["stage"] for f in flows] == [0, 1, 2, 3]
    assert {f["stages"] for f in flows} == {3}
    assert {f["on_failure"] for f in flows} == {"fail"}
    assert {f["workflow"] for f in flows} == {"review"}


def test_the_finish_task_receives_results_after_a_final_fan_out() -> None:
    sigs = nodes(chain(extract.s(project_id="p1"), fan_out(analyze)))
    assert sigs[-1].task == "haulage.finish"
    assert sigs[-1].kwargs["flow"]["input"] == "results"


def test_a_step_node_carries_only_references_and_its_own_arguments() -> None:
    first = nodes(chain(extract.s(project_id="p1")))[0]
    assert first.kwargs["params"] == {"project_id": "p1"}
    assert first.args == ()
    assert first.options["queue"] == "short"
    assert first.options["shadow"] == "review.unit_plan_extract"


def test_a_dynamic_fan_out_takes_its_items_from_the_previous_stage() -> None:
    sigs = nodes(chain(extract.s(project_id="p1"), fan_out(analyze, kwargs={"project_id": "p1"})))
    spec = sigs[1].kwargs["spec"]
    assert spec == {"steps": [{"step": "unit_plan_analyze", "params": {}}], "items": None,
                    "kwargs": {"project_id": "p1"}, "label": None}  # fmt: skip


def test_a_static_fan_out_carries_its_items_and_may_be_the_first_stage() -> None:
    items = [{"page": 1}, {"page": 2}]
    sigs = nodes(chain(fan_out(analyze, items), report.s()))
    assert sigs[0].task == "haulage.fan_out"
    assert sigs[0].kwargs["spec"]["items"] == items
    assert sigs[0].kwargs["key"] == "0:fan_out"


def test_a_fan_out_over_a_chain_runs_each_item_through_every_step() -> None:
    sigs = nodes(chain(fan_out(chain(analyze, refine.s()), [{"page": 3}])))
    assert [s["step"] for s in sigs[0].kwargs["spec"]["steps"]] == ["unit_plan_analyze", "unit_plan_refine"]


def test_nested_chains_are_flattened_into_one_list_of_stages() -> None:
    plan = chain(chain(extract.s(project_id="p"), fan_out(analyze)), report)
    assert len(plan.stages) == 3
    assert [s.task for s in nodes(plan)][:3] == ["unit_plan_extract", "haulage.fan_out", "unit_plan_report"]


def test_a_step_or_a_fan_out_on_its_own_is_a_one_stage_plan() -> None:
    assert len(as_plan(extract.s(project_id="p"), "w").stages) == 1
    assert len(as_plan(fan_out(analyze, [{"page": 1}]), "w").stages) == 1


def test_fan_out_items_get_keys_from_their_position() -> None:
    assert item_key(1, 0, 1, "analyze_page", 17) == "1:analyze_page[17]"
    assert item_key(2, 1, 2, "refine", 0) == "2.1:refine[0]"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: chain(), "chain() needs at least one stage"),
        (lambda: chain(extract.s(project_id="p"), 42), "chain stage 1: expected a step or step.s(...), got int"),
        (lambda: fan_out("analyze"), "fan_out target: expected a step or step.s(...), got str"),
        (lambda: fan_out(analyze, {"page": 1}), "fan_out items must be a list of dicts, got dict"),  # type: ignore[arg-type]
        (lambda: fan_out(analyze, [{"page": 1}, 2]), "fan_out item 1 must be a dict of parameters, got int"),  # type: ignore[list-item]
        (lambda: fan_out(analyze, [{"page": object()}]), "fan_out item 0 is not JSON-serialisable"),
        (lambda: fan_out(analyze, kwargs={"when": {1, 2}}), "fan_out kwargs are not JSON-serialisable"),
        (lambda: fan_out(chain(fan_out(analyze), report)), "fan_out over a chain that itself fans out"),
        (lambda: analyze.s(pages=[1]),
         "step 'unit_plan_analyze': unknown parameter(s) pages; it takes page, project_id"),
        (lambda: extract.s(project_id=b"p1"),
         "step 'unit_plan_extract': parameter 'project_id' is not JSON-serialisable"),
    ],
)  # fmt: skip
def test_a_bad_plan_fails_where_it_is_written(build: Any, message: str) -> None:
    with pytest.raises(PlanError) as info:
        build()
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (lambda: chain(fan_out(analyze), report),
         "the first stage cannot fan out over the previous stage's output: there is none"),
        (lambda: chain(extract.s()), "step 'unit_plan_extract' (stage 0): missing parameter(s) project_id"),
        (lambda: chain(extract.s(project_id="p"), no_input.s()),
         "step 'unit_plan_no_input' (stage 1): it receives the previous stage's output, so it needs a parameter"),
        (lambda: chain(extract.s(project_id="p"), refine.s(analysis={})),
         "step 'unit_plan_refine' (stage 1): parameter 'analysis' receives the previous stage's output; "
         "do not bind it"),
        (lambda: chain(fan_out(analyze, [{"page": 1}, {"pages": 2}])),
         "step 'unit_plan_analyze' (stage 0, item 1): unknown parameter(s) pages"),
        (lambda: chain(fan_out(analyze, [{"project_id": "p"}])),
         "step 'unit_plan_analyze' (stage 0, item 0): missing parameter(s) page"),
        (lambda: chain(fan_out(chain(analyze, no_input.s()), [{"page": 1}])),
         "step 'unit_plan_no_input' (stage 0, chained step 1): it receives the previous stage's output"),
    ],
)  # fmt: skip
def test_a_plan_that_would_fail_later_fails_when_it_is_compiled(plan: Any, message: str) -> None:
    with pytest.raises(PlanError) as info:
        nodes(plan())
    assert message in str(info.value)


def test_a_workflow_must_return_a_plan() -> None:
    with pytest.raises(PlanError) as info:
        as_plan(42, "review")
    assert str(info.value) == "workflow 'review' must return chain(...), fan_out(...) or a step, got int"
