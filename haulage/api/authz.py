"""What a caller may do: start a workflow (a pluggable check) and see a run (owner or admin).

The start check is a plain function ``(user, workflow, params) -> bool``;
replace the default with ``HAULAGE_API_AUTHORIZER=module:function`` or
``create_app(authorizer=...)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from haulage.api.auth import User
from haulage.errors import ConfigError
from haulage.workflows import RunRecord

Authorizer = Callable[[User, str, Mapping[str, Any]], bool]

#: the workflow parameter that names the project a run belongs to
PROJECT_PARAM = "project_id"
#: project roles that may start workflows in that project ("viewer" may only look)
START_ROLES = frozenset({"owner", "editor"})


def default_authorizer(user: User, workflow: str, params: Mapping[str, Any]) -> bool:
    """Admins may start anything; a run for a project needs an owner or editor role in that project.

    Workflows without a ``project_id`` parameter belong to no project, so any
    authenticated user may start them; install a stricter check for those if
    needed.

    >>> default_authorizer(User("ana", roles={"p1": "editor"}), "plan_review", {"project_id": "p1"})
    True
    >>> default_authorizer(User("ana", roles={"p1": "viewer"}), "plan_review", {"project_id": "p1"})
    False
    """
    if user.admin:
        return True
    if PROJECT_PARAM not in params:
        return True
    project = params[PROJECT_PARAM]
    return isinstance(project, str) and user.roles.get(project) in START_ROLES


def load_authorizer(path: str) -> Authorizer:
    """Import ``module:function``; ConfigError when it is not there or not callable."""
    module_name, _, attr = path.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"HAULAGE_API_AUTHORIZER: cannot load {path!r}: {exc}") from exc
    if not callable(func):
        raise ConfigError(f"HAULAGE_API_AUTHORIZER: {path!r} is not callable")
    return func


def can_see(user: User, run: RunRecord) -> bool:
    """Users see the runs they created; admins see every run."""
    return user.admin or (run.created_by is not None and run.created_by == user.id)
