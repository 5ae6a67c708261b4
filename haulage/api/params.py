"""Workflow parameters received over HTTP: checked as JSON, then by the workflow, before anything is created.

Field names in the errors are paths in the request body (``params.x``,
``items.3.country``), so a client can point at what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from haulage.errors import InvalidParams
from haulage.jsonutil import dumps
from haulage.workflows import Workflow

#: the meta-arguments of Workflow.start: a workflow parameter of the same name cannot be passed through it
RESERVED_PARAMS = ("created_by", "idempotency_key", "tags")


def _prefixed(exc: InvalidParams, prefix: str) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors:
        name = str(err.get("field", ""))
        path = prefix if name in ("", "(parameters)") else f"{prefix}.{name}"
        out.append({**err, "field": path})
    return out


def validate_params(wf: Workflow, params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The JSON form of valid parameters; InvalidParams whose fields are paths in the request body."""
    reserved = [
        {"field": f"{prefix}.{name}", "message": "is reserved for the run's metadata and cannot be a parameter"}
        for name in RESERVED_PARAMS
        if name in params
    ]
    if reserved:
        raise InvalidParams(wf.name, reserved)
    _check_json_types(wf, params, prefix)
    try:
        _, json_params = wf.validate(dict(params))
    except InvalidParams as exc:
        raise InvalidParams(wf.name, _prefixed(exc, prefix)) from None
    wf.check_params_size(json_params, prefix)  # every item of a batch, before any run is created
    return json_params


def _check_json_types(wf: Workflow, params: Mapping[str, Any], prefix: str) -> None:
    """Hold JSON to its own types: ``true`` or ``"1"`` is not an integer, whatever lax coercion would make of it.

    The engine validates Python callers leniently; on the wire the document's
    schema is the contract, so the same model is applied in strict JSON mode first.
    """
    try:
        wf.params_model.model_validate_json(dumps(dict(params)), strict=True)
    except ValidationError as exc:
        raise InvalidParams(
            wf.name,
            [
                {
                    "field": ".".join([prefix, *(str(p) for p in err["loc"])]),
                    "message": err["msg"],
                    "input": err.get("input") if err["type"] != "missing" else None,
                }
                for err in exc.errors(include_url=False)
            ],
        ) from None
