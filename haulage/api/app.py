"""``create_app``: the HTTP service, assembled from its settings.

    uvicorn --factory haulage.api.app:create_app      # or: python -m haulage.api --port 8000
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from haulage.api import events, health, page, routes
from haulage.api.auth import Authenticator, build_authenticator
from haulage.api.authz import Authorizer, default_authorizer, load_authorizer
from haulage.api.deps import ApiContext
from haulage.api.errors import BadRequest, HttpError, Unprocessable, error_response
from haulage.api.guard import RequestGuard
from haulage.api.openapi import build_openapi
from haulage.api.settings import ApiSettings
from haulage.api.streams import StreamLimits
from haulage.errors import ConfigError, HaulageError, UnknownWorkflow
from haulage.workflows import Workflow, registry

log = logging.getLogger("haulage.api")

DESCRIPTION = """Start Haulage workflows by name and follow them.

Every `/v1` call needs `Authorization: Bearer <token>`: a Firebase ID token (production) or the
development token. Errors are `{"error": {"type", "message", "fields": [{"field", "message"}]}}`.
"""


def create_app(
    settings: ApiSettings | None = None,
    *,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer | None = None,
) -> FastAPI:
    """The service. Settings default to the environment (HAULAGE_API_*); the workflows come from HAULAGE_MODULES.

    ``authenticator`` and ``authorizer`` replace the configured ones (tests, or
    an application with its own rules).
    """
    settings = settings or ApiSettings.from_env()
    registry.load_modules()
    ctx = ApiContext(
        settings=settings,
        authenticator=authenticator or build_authenticator(settings),
        authorizer=authorizer or (load_authorizer(settings.authorizer) if settings.authorizer else default_authorizer),
        workflows=_exposed(settings),
        streams=StreamLimits(settings.max_streams_per_user),
    )
    # The docs pages pull Swagger UI / ReDoc from a CDN onto the origin whose storage holds the
    # token: off unless asked for (on by default in dev mode). The document itself is always at
    # /v1/openapi.json, behind the token like the workflow list it describes.
    docs = settings.docs_enabled
    app = FastAPI(title="Haulage", version="1", description=DESCRIPTION, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)  # fmt: skip
    app.state.haulage = ctx
    _install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(events.router)
    app.include_router(health.router)
    page.install(app)
    app.add_middleware(RequestGuard, authenticator=ctx.authenticator, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(page.SecurityHeaders)  # outside the guard: its refusals carry the headers too
    if settings.cors_origins:
        # Added last, so it is outermost: preflight requests carry no token and are answered here.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)  # fmt: skip
    app.openapi = lambda: build_openapi(app, ctx)  # type: ignore[method-assign]

    if ctx.authenticator.mode == "none":
        log.warning("HAULAGE_API_AUTH is not set: every /v1 call will be refused (401)")
    log.info("haulage api: auth=%s, workflows=%s", ctx.authenticator.mode, ", ".join(ctx.workflows) or "none")
    return app


def _exposed(settings: ApiSettings) -> dict[str, Workflow]:
    if not settings.workflows:
        return {wf.name: wf for wf in registry.all_workflows()}
    try:
        return {name: registry.get(name) for name in settings.workflows}
    except UnknownWorkflow as exc:
        raise ConfigError(f"HAULAGE_API_WORKFLOWS: {exc}") from None


def _install_error_handlers(app: FastAPI) -> None:
    async def haulage_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(BadRequest("malformed JSON body"))
        fields = []
        for e in errors:
            loc = [str(p) for p in e.get("loc", ())]
            # ("body", "params", "x") -> "params.x"; ("query", "limit") -> "limit"
            path = ".".join(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else ".".join(loc)
            entry: dict[str, Any] = {"field": path or "(body)", "message": e.get("msg", "")}
            if e.get("type") != "missing" and e.get("input") is not None:
                entry["input"] = e["input"]
            fields.append(entry)
        names = ", ".join(f["field"] for f in fields)
        return error_response(Unprocessable(f"invalid request: {names}", fields=fields))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        response = error_response(HttpError(str(exc.detail), exc.status_code))
        response.headers.update(exc.headers or {})
        return response

    app.add_exception_handler(HaulageError, haulage_error)
    app.add_exception_handler(RedisError, haulage_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, haulage_error)  # logged, answered 500 without details
