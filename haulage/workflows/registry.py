"""Workflows by name, and loading the application modules that define them.

``registry.get("review_plan").start(...)`` starts a workflow from outside
Python; ``load_modules()`` imports HAULAGE_MODULES so that workers, the CLI
and the HTTP service all see the same workflows.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from haulage.errors import ConfigError, ModuleLoadError, UnknownWorkflow
from haulage.settings import get_settings

if TYPE_CHECKING:
    from haulage.workflows.workflow import Workflow

_workflows: dict[str, Workflow] = {}


def register(wf: Workflow) -> None:
    existing = _workflows.get(wf.name)
    if existing is not None and existing.func.__qualname__ != wf.func.__qualname__:
        raise ConfigError(
            f"workflow {wf.name!r} is already registered by {existing.func.__module__}.{existing.func.__qualname__}"
        )
    _workflows[wf.name] = wf


def get(name: str) -> Workflow:
    """The workflow called ``name``; UnknownWorkflow lists the known ones."""
    try:
        return _workflows[name]
    except KeyError:
        raise UnknownWorkflow(name, _workflows) from None


def names() -> list[str]:
    return sorted(_workflows)


def all_workflows() -> list[Workflow]:
    return [_workflows[n] for n in names()]


def load_modules(modules: Iterable[str] | None = None) -> list[str]:
    """Import the application modules (default: HAULAGE_MODULES); return their names."""
    wanted = list(get_settings().modules if modules is None else modules)
    for module in wanted:
        try:
            importlib.import_module(module)
        except (ImportError, SyntaxError) as exc:  # a typo in the user's module is theirs to fix: say where
            raise ModuleLoadError(f"cannot import {module!r} from HAULAGE_MODULES: {exc}") from exc
    return wanted
