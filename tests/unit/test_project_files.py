"""The files operators rely on stay true: docker-compose.yml and the README's configuration table."""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import yaml

from tests.conftest import ROOT

SOURCES = [p for d in ("haulage", "tasks", "workflows", "dispatch") for p in (ROOT / d).rglob("*.py")]
SOURCES.append(ROOT / "celeryconfig.py")
#: variables read by libraries Haulage drives, set in deployments on purpose
THIRD_PARTY = {"FIRESTORE_EMULATOR_HOST", "FLOWER_UNAUTHENTICATED_API", "GOOGLE_CLOUD_PROJECT"}


def variables_read() -> set[str]:
    found: set[str] = set()
    for path in SOURCES:
        found |= set(re.findall(r"\b(HAULAGE_[A-Z0-9_]+)\b", path.read_text()))
    # HAULAGE_CELERY_<NAME> is one documented family, not a variable of its own.
    return {v for v in found if not v.endswith("_") and not v.startswith("HAULAGE_CELERY_")} | THIRD_PARTY


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_every_compose_service_runs_a_real_command() -> None:
    from haulage.cli.main import build_parser

    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    services = compose()["services"]
    expected = {"redis", "worker-short", "worker-long", "dispatcher", "beat", "flower", "firestore", "cloudrun", "api"}
    assert expected <= set(services)
    for name, service in services.items():
        command = service["command"]
        if command[0] == "haulage":
            assert command[1] in subcommands, f"{name}: haulage has no {command[1]!r} command"
        elif command[0] == "python":
            assert command[1] == "-m" and importlib.util.find_spec(command[2]) is not None, f"{name}: {command}"
        else:
            assert name in {"redis", "firestore"}, f"{name} runs {command[0]!r}, which is not Haulage's"


def test_compose_sets_only_variables_haulage_reads() -> None:
    known = variables_read()
    for name, service in compose()["services"].items():
        for var in service.get("environment") or {}:
            assert var in known, f"service {name} sets {var}, which nothing reads"


def test_compose_redis_persists_with_aof() -> None:
    redis = compose()["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.startswith("redis-data:") for v in redis["volumes"])
    assert "redis-data" in compose()["volumes"]
    assert "HAULAGE_FLOWER_BASIC_AUTH" in compose()["services"]["flower"]["environment"]


def test_readme_documents_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = sorted(v for v in variables_read() - THIRD_PARTY if f"`{v}`" not in readme)
    assert not missing, f"README's configuration table lacks {missing}"


def test_ci_tests_the_lowest_versions_pyproject_allows() -> None:
    """.ci/run's second pass pins exactly the lower bounds pyproject.toml declares."""
    import tomllib

    declared: dict[str, str] = {}
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        found = re.match(r"([a-z0-9-]+)(?:\[[^\]]*\])?>=([0-9.]+)", requirement)
        if found:
            declared[found[1]] = found[2]
    pinned = dict(re.findall(r"^([a-z0-9-]+)==([0-9.]+)$", (ROOT / ".ci" / "lowest.txt").read_text(), re.M))
    assert set(pinned) >= {"celery", "kombu", "redis"}
    for name, version in pinned.items():
        assert declared[name] == version, f"pyproject allows {name}>={declared[name]}, CI tests {version}"
