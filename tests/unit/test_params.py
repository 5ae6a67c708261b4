"""Workflow parameters, checked against the function's type hints before anything is written or enqueued.

What a user sees through these: one ``InvalidParams`` that names every wrong,
missing or unknown field with the rule and the value given, the values the
workflow function receives (converted to their hinted types), the JSON form
recorded on the run, and a bad declaration stopping at import.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field

from haulage.errors import ConfigError, InvalidParams
from haulage.tasks import StepContext, step
from haulage.workflows import chain, workflow

pytestmark = pytest.mark.timeout(30)


@step(name="unit_params_noop")
def noop(ctx: StepContext) -> None:
    return None


class Invoice(BaseModel):
    invoice_id: str
    amount: float


@workflow("unit_params_review")
def review(project_id: str, pages: list[int], due: datetime.date | None = None,
           priority: Annotated[int, Field(ge=1, le=5)] = 3) -> Any:  # fmt: skip
    return chain(noop)


@workflow("unit_params_invoices")
def invoices(invoices: list[Invoice]) -> Any:
    return chain(noop)


@workflow("unit_params_open")
def open_ended(project_id: str, **extra: Any) -> Any:
    return chain(noop)


def errors_of(call: Any) -> list[dict[str, Any]]:
    with pytest.raises(InvalidParams) as info:
        call()
    return info.value.errors


def test_valid_parameters_are_converted_to_their_hinted_types_and_recorded_as_json() -> None:
    values, recorded = review.validate({"project_id": "p1", "pages": ["1", 2], "due": "2026-12-24"})
    assert values == {"project_id": "p1", "pages": [1, 2], "due": datetime.date(2026, 12, 24), "priority": 3}
    assert recorded == {"project_id": "p1", "pages": [1, 2], "due": "2026-12-24", "priority": 3}


def test_nested_models_reach_the_function_as_models() -> None:
    values, recorded = invoices.validate({"invoices": [{"invoice_id": "A", "amount": "9.5"}]})
    assert values["invoices"] == [Invoice(invoice_id="A", amount=9.5)]
    assert recorded == {"invoices": [{"invoice_id": "A", "amount": 9.5}]}


@pytest.mark.parametrize(
    ("params", "field", "message", "given"),
    [
        ({"pages": [1]}, "project_id", "Field required", None),
        ({"project_id": "p", "pages": [1, "two"]}, "pages.1", "valid integer", "two"),
        ({"project_id": "p", "pages": "1,2"}, "pages", "valid list", "1,2"),
        ({"project_id": "p", "pages": [1], "priority": 9}, "priority", "less than or equal to 5", 9),
        ({"project_id": "p", "pages": [1], "due": "someday"}, "due", "valid date", "someday"),
        ({"project_id": "p", "pages": [1], "colour": "red"}, "colour", "Extra inputs are not permitted", "red"),
    ],
)  # fmt: skip
def test_a_wrong_parameter_is_named_with_the_rule_and_the_value(params: dict[str, Any], field: str, message: str,
                                                                given: Any) -> None:  # fmt: skip
    (error,) = errors_of(lambda: review.validate(params))
    assert error["field"] == field
    assert message in error["message"]
    assert error["input"] == given


def test_every_problem_is_reported_at_once_in_the_message() -> None:
    with pytest.raises(InvalidParams) as info:
        review.validate({"pages": ["x"], "colour": 1})
    assert info.value.workflow == "unit_params_review"
    assert sorted(e["field"] for e in info.value.errors) == ["colour", "pages.0", "project_id"]
    text = str(info.value)
    assert text.startswith("invalid parameters for workflow 'unit_params_review': ")
    assert "project_id: Field required" in text and "pages.0: " in text and "colour: " in text


def test_a_nested_field_is_named_by_its_path() -> None:
    (error,) = errors_of(lambda: invoices.validate({"invoices": [{"invoice_id": "A"}]}))
    assert error["field"] == "invoices.0.amount"
    assert error["message"] == "Field required"


def test_a_workflow_with_keyword_arguments_accepts_extra_parameters() -> None:
    values, recorded = open_ended.validate({"project_id": "p", "colour": "red"})
    assert values == {"project_id": "p", "colour": "red"}
    assert recorded == values


def test_run_options_are_checked_before_the_parameters_and_the_store() -> None:
    errors = errors_of(lambda: review.start(created_by=7, idempotency_key="", tags="urgent", project_id="p", pages=[1]))
    assert [(e["field"], e["message"], e["input"]) for e in errors] == [
        ("created_by", "must be a string", 7),
        ("idempotency_key", "must be a non-empty string", ""),
        ("tags", "must be a list of strings", "urgent"),
    ]


def test_bad_parameters_stop_start_before_anything_is_written() -> None:
    # Validation comes before the store is asked for: this test needs no Redis.
    (error,) = errors_of(lambda: review.start(project_id="p", pages=[1], priority=0))
    assert error["field"] == "priority"


def test_the_schema_describes_the_parameters() -> None:
    schema = review.parameters_schema()
    assert set(schema["properties"]) == {"project_id", "pages", "due", "priority"}
    assert schema["required"] == ["project_id", "pages"]
    assert schema["properties"]["priority"]["maximum"] == 5


def test_parameters_that_cannot_be_named_are_refused_at_declaration() -> None:
    with pytest.raises(ConfigError) as info:

        @workflow("unit_params_positional")
        def positional(*pages: int) -> Any:
            return chain(noop)

    assert str(info.value) == "workflow 'unit_params_positional': parameters must be nameable; 'pages' is not"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_failure": "ignore"}, "on_failure must be one of collect, fail, got 'ignore'"),
        ({"schedule": "hourly"}, "schedule must be a crontab(...) or seconds, got 'hourly'"),
        ({"schedule": 0}, "schedule must be more than 0 seconds, got 0"),
    ],
)
def test_bad_workflow_options_are_refused_at_declaration(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        workflow("unit_params_bad", **options)
    assert message in str(info.value)


def test_a_schedule_whose_parameters_can_never_validate_fails_at_import() -> None:
    with pytest.raises(InvalidParams) as info:

        @workflow("unit_params_scheduled", schedule=60, schedule_params={"project_id": "p"})
        def scheduled(project_id: str, pages: list[int]) -> Any:
            return chain(noop)

    assert [e["field"] for e in info.value.errors] == ["pages"]
