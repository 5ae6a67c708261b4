"""The built wheel, installed into an existing application beside its own tasks.py and celeryconfig.py.

This is how a team adopts Haulage: `pip install haulage` (no extras: Redis
only) into an app that already has the names Celery's tutorial gives it. The
wheel must bring exactly one top-level name, the app's modules must stay the
app's, and a workflow defined in the app's ``tasks.py`` must run on a
``haulage worker`` started in the app's folder with default settings.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_until
from tests.integration.test_pytest_celery import run_app_tests

FIXTURE_APP = ROOT / "tests" / "fixtures" / "app"
pytestmark = pytest.mark.slow


def _build_wheel(out: Path) -> Path:
    # Build from a copy so the build's scratch folders never land in the checkout.
    src = out / "src"
    skip = shutil.ignore_patterns(".venv*", ".git", ".haulage", "*.egg-info", "build", "dist", "__pycache__",
                                  ".mypy_cache", ".ruff_cache")  # fmt: skip
    shutil.copytree(ROOT, src, ignore=skip)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = out.glob("haulage-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(the wheel, the app's folder, the app's venv) with the wheel installed, without extras."""
    base = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(base)
    app = base / "app"
    shutil.copytree(FIXTURE_APP, app)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    yield wheel, app, venv


def app_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The app's environment: none of the test suite's settings, nothing of this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAULAGE_") and k != "PYTHONPATH"}
    return {**env, "HAULAGE_REDIS_URL": redis_url, "HAULAGE_MODULES": "tasks", **extra}


def test_wheel_has_one_top_level_name(installed_app: tuple[Path, Path, Path]) -> None:
    wheel, _, _ = installed_app
    names = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {n for n in names if not n.endswith(".dist-info")} == {"haulage"}
    members = set(zipfile.ZipFile(wheel).namelist())
    assert "haulage/py.typed" in members
    assert not any(m.startswith(("haulage/celeryconfig", "celeryconfig")) for m in members)


def test_base_install_brings_no_grpc(installed_app: tuple[Path, Path, Path]) -> None:
    """An app that needs only Redis does not install gRPC, Firestore or the HTTP stack."""
    _, app, venv = installed_app
    for module in ("grpc", "google.cloud.firestore", "fastapi"):
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], cwd=app,
                               capture_output=True, timeout=60)  # fmt: skip
        assert probe.returncode != 0, f"{module} is installed by the base wheel"


def test_workflow_runs_in_the_app_beside_its_own_tasks_and_celeryconfig(
    installed_app: tuple[Path, Path, Path], redis_server: str, tmp_path: Path
) -> None:
    _, app, venv = installed_app
    # Database 1: the suite's own workers (on database 0) must not take the app's messages.
    env = app_env(redis_server.rsplit("/", 1)[0] + "/1")
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([str(venv / "bin" / "haulage"), "worker", "--concurrency", "2"], cwd=app, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: " ready." in log.read_text(errors="replace") or worker.poll() is not None, timeout=60,
                   what="the app's haulage worker")  # fmt: skip
        assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
        done = subprocess.run([str(venv / "bin" / "python"), "client.py"], cwd=app, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:] + log.read_text(errors="replace")[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["status"] == "COMPLETE"
        assert report["result"] == 1 + 4 + 9 + 16
        assert report["roles"] == ["the application's api package", "the application's cli package",
                                   "the application's celeryconfig.py", "the application's tasks.py"]  # fmt: skip
        assert report["haulage"].startswith(str(venv)), "haulage came from somewhere other than the installed wheel"
        listed = subprocess.run([str(venv / "bin" / "haulage"), "status", report["run_id"], "--json"], cwd=app,
                                env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["status"] == "COMPLETE"
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)


def test_unsafe_deployment_settings_are_refused(installed_app: tuple[Path, Path, Path], redis_server: str) -> None:
    """Pointing HAULAGE_CELERYCONFIG at settings that break the guarantees stops the worker with the reason."""
    _, app, venv = installed_app
    env = app_env(redis_server, HAULAGE_CELERYCONFIG="celeryconfig")
    done = subprocess.run([str(venv / "bin" / "haulage"), "worker"], cwd=app, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "task_acks_late" in done.stderr and "celeryconfig" in done.stderr, done.stderr


def test_the_apps_own_tests_run_on_the_installed_plugin(installed_app: tuple[Path, Path, Path]) -> None:
    """`pip install haulage pytest` and the app's own tests (the README's recipe) pass, warnings as errors."""
    _, app, venv = installed_app
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "pytest>=8"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    done, seconds = run_app_tests(app, str(venv / "bin" / "python"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout, done.stdout
    assert seconds < 30, f"the app's pytest took {seconds:.1f} s"
