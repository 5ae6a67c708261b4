"""Errors of the HTTP service, and the one place where every error becomes an HTTP answer.

The service's own errors join the engine's hierarchy (``HaulageError``), so a
handler raises whatever it meets and :func:`status_for` picks the code. Every
error body has the same shape::

    {"error": {"type": "InvalidParams", "message": "...", "fields": [{"field": "params.x", ...}]}}
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from haulage.errors import (
    BrokerUnavailable,
    ConfigError,
    HaulageError,
    IdempotencyConflict,
    InvalidParams,
    ModuleLoadError,
    ParamsTooLarge,
    PlanError,
    RunCancelled,
    RunNotFinished,
    RunNotFound,
    StoreUnavailable,
    UnknownWorkflow,
)
from haulage.jsonutil import dumps

log = logging.getLogger("haulage.api")

#: longest ``input`` echoed back in a field error, in characters of JSON
_ECHO_LIMIT = 200


class ApiError(HaulageError):
    """Raised when an HTTP request is refused before it reaches the engine."""

    status = 400

    def __init__(self, message: str, fields: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or []


class BadRequest(ApiError):
    """Raised when a request is malformed (not JSON, not an object, bad framing)."""


class Unauthenticated(ApiError):
    """Raised when a call carries no valid credentials, or authentication is not configured."""

    status = 401


class Forbidden(ApiError):
    """Raised when an authenticated user may not do what the request asks."""

    status = 403


class PayloadTooLarge(ApiError):
    """Raised when a request body exceeds HAULAGE_API_MAX_BODY_BYTES."""

    status = 413


class UnsupportedMediaType(ApiError):
    """Raised when a request body is not sent as application/json."""

    status = 415


class Unprocessable(ApiError):
    """Raised when a request's fields are well-formed JSON but wrong (type, range, unknown field)."""

    status = 422


class TooManyRequests(ApiError):
    """Raised when a user holds more event streams than HAULAGE_API_MAX_STREAMS_PER_USER."""

    status = 429


class HttpError(ApiError):
    """Raised for routing errors (unknown path, method not allowed) with the router's status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ServiceUnavailable(ApiError):
    """Raised when a dependency (Redis, the token issuer's certificates) cannot be reached."""

    status = 503


# Engine errors -> HTTP. Looked up along the class's MRO, so subclasses inherit their parent's code.
_ENGINE_STATUS: dict[type[BaseException], int] = {
    ParamsTooLarge: 413,
    InvalidParams: 422,
    UnknownWorkflow: 404,
    RunNotFound: 404,
    IdempotencyConflict: 409,
    RunNotFinished: 409,
    RunCancelled: 409,
    BrokerUnavailable: 503,
    StoreUnavailable: 503,
    RedisError: 503,
    # A malformed plan or a module that does not import is the server's fault, not the caller's.
    PlanError: 500,
    ConfigError: 500,
    ModuleLoadError: 500,
}


_UNAVAILABLE: dict[type[BaseException], str] = {
    BrokerUnavailable: "the task broker is unavailable; retry later",
    StoreUnavailable: "the run store is unavailable; retry later",
}


def status_for(exc: BaseException) -> int:
    """The HTTP status for ``exc`` (500 for anything not known to be the caller's doing)."""
    if isinstance(exc, ApiError):
        return exc.status
    for cls in type(exc).__mro__:
        if cls in _ENGINE_STATUS:
            return _ENGINE_STATUS[cls]
    return 500


def _echo(value: Any) -> Any:
    """The offending input, when it is small enough to be worth echoing."""
    try:
        text = dumps(value)
    except (TypeError, ValueError):
        return repr(value)[:_ECHO_LIMIT]
    return value if len(text) <= _ECHO_LIMIT else f"{text[:_ECHO_LIMIT]}..."


def field_errors(exc: BaseException) -> list[dict[str, Any]]:
    """Field-level errors of ``exc`` (paths relative to the request body), inputs echoed when small."""
    raw: list[dict[str, Any]] = []
    if isinstance(exc, InvalidParams):
        raw = exc.errors
    elif isinstance(exc, ApiError):
        raw = exc.fields
    out = []
    for err in raw:
        entry = {"field": str(err.get("field") or "(body)"), "message": str(err.get("message", ""))}
        if err.get("input") is not None:
            entry["input"] = _echo(err["input"])
        out.append(entry)
    return out


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON answer for ``exc``; unexpected errors are logged and not described to the caller."""
    status = status_for(exc)
    if status >= 500 and not isinstance(exc, (ApiError, BrokerUnavailable, StoreUnavailable, RedisError)):
        log.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    if status == 500:
        # The traceback is in the log; the caller gets what it can act on.
        message = f"internal error ({type(exc).__name__}); see the service log"
        if isinstance(exc, (PlanError, ConfigError, ModuleLoadError)):
            message = str(exc)
    elif isinstance(exc, RedisError):
        message = "the run store (Redis) is unavailable; retry later"
    elif isinstance(exc, BrokerUnavailable | StoreUnavailable):
        # Their messages name hosts and ports: those stay in the log.
        log.warning("request failed: %s: %s", type(exc).__name__, exc)
        message = _UNAVAILABLE[BrokerUnavailable if isinstance(exc, BrokerUnavailable) else StoreUnavailable]
    else:
        message = str(exc)
    body: dict[str, Any] = {"type": type(exc).__name__, "message": message}
    errs = field_errors(exc)
    if errs:
        body["fields"] = errs
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="haulage"'
    if status in (429, 503):
        headers["Retry-After"] = "5"
    return JSONResponse({"error": body}, status_code=status, headers=headers)
