"""What route handlers are given: the service context, the caller, and runs the caller may see."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from haulage.api.auth import Authenticator, User
from haulage.api.authz import Authorizer, can_see
from haulage.api.errors import Unauthenticated
from haulage.api.guard import USER_KEY
from haulage.api.models import API_KEY_PREFIX
from haulage.api.settings import ApiSettings
from haulage.api.streams import StreamLimits
from haulage.errors import RunNotFound, UnknownWorkflow
from haulage.workflows import RUN_ID_PATTERN as _RUN_ID
from haulage.workflows import Run, RunRecord, Workflow

# Declares the scheme in the OpenAPI document; the RequestGuard has already checked the token.
_bearer = HTTPBearer(auto_error=False, description="a Firebase ID token, or the development token")

#: a run id is the hex of a UUID; anything else is refused (422) before any store sees it
RUN_ID_PATTERN = f"^{_RUN_ID}$"


@dataclass(frozen=True)
class ApiContext:
    """Everything the routes need, built once by ``create_app``."""

    settings: ApiSettings
    authenticator: Authenticator
    authorizer: Authorizer
    workflows: dict[str, Workflow]  #: the workflows exposed over HTTP, by name
    streams: StreamLimits  #: open event streams per user (HAULAGE_API_MAX_STREAMS_PER_USER)

    def workflow(self, name: str) -> Workflow:
        try:
            return self.workflows[name]
        except KeyError:
            raise UnknownWorkflow(name, self.workflows) from None


def get_context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.haulage
    return ctx


def current_user(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> User:
    user = request.scope.get("state", {}).get(USER_KEY)
    if not isinstance(user, User):  # a route outside /v1/ asked for a user: refuse rather than guess
        raise Unauthenticated("this route needs an authenticated user")
    return user


def visible_run(
    run_id: Annotated[str, Path(pattern=RUN_ID_PATTERN, description="the run id")],
    user: User = Depends(current_user),
) -> RunRecord:
    """The run's document; another user's run is reported as not found, so ids cannot be probed."""
    record = Run(run_id).status()  # RunNotFound when there is none
    if not can_see(user, record):
        raise RunNotFound(f"no run with id {run_id!r}")
    return record


def scoped_key(user: User, key: str | None) -> str | None:
    """Idempotency keys are per user, and in a namespace of their own.

    Two users choosing the same key must not share (or probe) a run, and no
    caller over HTTP can name an internal key (a schedule tick, a follow-up).
    """
    return None if key is None else f"{API_KEY_PREFIX}{quote(user.id, safe='')}:{key}"


Context = Annotated[ApiContext, Depends(get_context)]
CurrentUser = Annotated[User, Depends(current_user)]
VisibleRun = Annotated[RunRecord, Depends(visible_run)]
