"""Testing your own workflows with Haulage's pytest plugin, as an application's test suite does.

The application (tests/fixtures/app) has its own tests on the plugin's
fixtures: ``haulage_redis`` (a Redis of the session's own, applied to Haulage
although the test module imported the app's workflows first), ``haulage_worker``
(an in-process worker) and ``haulage.testing.StepContext`` (a step called
directly). They run here in a fresh pytest process, from a copy of the app,
with warnings as errors, and must stop promptly. The README's recipe is that
test file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

APP = ROOT / "tests" / "fixtures" / "app"
RECIPE = APP / "tests" / "test_workflows.py"

pytestmark = pytest.mark.timeout(120)


def run_app_tests(app: Path, python: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """The app's own `pytest`, in its folder, with nothing of this suite's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAULAGE_") and k != "PYTHONPATH"}
    started = time.monotonic()
    done = subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-q"], cwd=app, env=env,
                          capture_output=True, text=True, timeout=110)  # fmt: skip
    return done, time.monotonic() - started


def test_the_apps_tests_pass_on_the_plugin_with_warnings_as_errors(tmp_path: Path) -> None:
    app = tmp_path / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    done, seconds = run_app_tests(app, sys.executable)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout and "warning" not in done.stdout.lower(), done.stdout
    assert "Retry limit exceeded" not in done.stdout + done.stderr  # no 20-30 s of reconnects at the end
    print(f"\nthe app's tests on the plugin: {seconds:.1f} s for the whole pytest process")
    assert seconds < 30, f"the app's pytest took {seconds:.1f} s"


def test_the_readme_recipe_is_the_tested_file() -> None:
    readme = (ROOT / "README.md").read_text()
    body = RECIPE.read_text().split('"""', 2)[2].strip()  # without the module docstring
    assert body in readme, "README's 'Testing your own workflows' must show tests/fixtures/app/tests/test_workflows.py"
