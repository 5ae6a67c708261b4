"""Checking workflow parameters against the function's type hints, with pydantic."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from haulage.errors import ConfigError, InvalidParams


def params_model(name: str, func: Callable[..., Any]) -> type[BaseModel]:
    """A pydantic model of ``func``'s parameters; unknown names are rejected."""
    hints = typing.get_type_hints(func, include_extras=True)  # keep Annotated[..., Field(...)] limits
    fields: dict[str, Any] = {}
    extra = "forbid"
    for p in inspect.signature(func).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            extra = "allow"
            continue
        if p.kind is p.VAR_POSITIONAL or p.kind is p.POSITIONAL_ONLY:
            raise ConfigError(f"workflow {name!r}: parameters must be nameable; {p.name!r} is not")
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    config = ConfigDict(extra=extra, arbitrary_types_allowed=False)  # type: ignore[typeddict-item]
    return create_model(f"{name}_params", __config__=config, **fields)


def validate_params(
    workflow: str, model: type[BaseModel], params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validated values for calling the workflow function, and their JSON form for the run document."""
    try:
        parsed = model.model_validate(params)
    except ValidationError as exc:
        raise InvalidParams(
            workflow,
            [
                {
                    "field": ".".join(str(p) for p in err["loc"]) or "(parameters)",
                    "message": err["msg"],
                    "input": err.get("input") if err["type"] != "missing" else None,
                }
                for err in exc.errors(include_url=False)
            ],
        ) from None
    values = {name: getattr(parsed, name) for name in type(parsed).model_fields}
    values.update(parsed.model_extra or {})
    return values, parsed.model_dump(mode="json")
