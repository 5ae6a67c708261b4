"""The run documents through the real Firebase web SDK (Node), as a product's frontend subscribes to them.

`subscribe.mjs` (the `firebase` npm package, pinned in package-lock.json) connects to the Firestore
emulator with a signed-in user's identity, follows one run's document and step rows under
haulage/progress/firestore/firestore.rules, and checks what a progress page relies on. Node and npm must be on PATH; the
packages are installed with `npm ci` into a cache folder outside the checkout. Without Node or the
emulator the test skips locally, and fails when CI is "true".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, WorkerProcess

HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]


def missing(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason}, and CI must run the frontend test")
    pytest.skip(reason)


def installed_client() -> Path:
    """A folder holding subscribe.mjs beside node_modules from `npm ci` (cached by the lock file's hash)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        missing("node and npm are not on PATH")
    lock = (HERE / "package-lock.json").read_bytes()
    cache = Path.home() / ".cache" / "haulage-frontend" / hashlib.sha256(lock).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(HERE / name, cache / name)
    if not (cache / "node_modules" / "firebase").is_dir():
        out = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=cache, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        if out.returncode != 0:
            missing(f"npm ci failed (no registry?): {out.stderr[-1500:]}")
    shutil.copyfile(HERE / "subscribe.mjs", cache / "subscribe.mjs")
    return cache


@pytest.fixture
def world(redis_server: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Runs in the emulator's `tasks` collection, where the rules apply; a worker of their own."""
    from tests.firestore_support import TEST_PROJECT, session_emulator

    host = session_emulator()  # started with haulage/progress/firestore/firestore.rules loaded
    env = {"HAULAGE_REDIS_URL": redis_server.rsplit("/", 1)[0] + "/3", "HAULAGE_STORE": "firestore",
           "FIRESTORE_EMULATOR_HOST": host, "HAULAGE_FIRESTORE_PROJECT": TEST_PROJECT,
           "HAULAGE_FIRESTORE_COLLECTION": "tasks",
           "HAULAGE_MODULES": "tests.flows,haulage.examples,tests.document_flows"}  # fmt: skip
    worker = WorkerProcess(tmp_path / "fe-worker.log", extra_env=env)
    worker.start()
    yield env
    worker.stop()


def test_a_web_client_follows_a_run_with_failures(world: dict[str, str]) -> None:
    from haulage.workflows.workflow import keyed_run_id

    client = installed_client()
    email, key = f"fe-{uuid.uuid4().hex[:8]}@example.com", uuid.uuid4().hex
    run_id = keyed_run_id("t_docs", email, key)  # known before the run exists: the client subscribes at once
    env = {**os.environ, "FIRESTORE_EMULATOR_HOST": world["FIRESTORE_EMULATOR_HOST"],
           "PROJECT": world["HAULAGE_FIRESTORE_PROJECT"], "COLLECTION": "tasks", "RUN_ID": run_id,
           "OWNER_UID": f"uid-{uuid.uuid4().hex[:8]}", "OWNER_EMAIL": email, "DEADLINE_MS": "120000"}  # fmt: skip
    node = subprocess.Popen(["node", "subscribe.mjs"], cwd=client, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert node.stdout is not None
        first = node.stdout.readline()  # the clients are initialised; it subscribes (and retries) from here
        assert first.strip() == "ready", first
        started = subprocess.run(
            [sys.executable, "-m", "haulage.cli", "run", "t_docs", "-p", "n=8", "-p", "fail_on=[2,5]", "-p",
             "pause=1.0", "--created-by", email, "--idempotency-key", key],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **world}, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        assert started.stdout.split()[-1] == run_id
        rest, errors = node.communicate(timeout=200)
    finally:
        if node.poll() is None:
            node.kill()
            node.communicate()
    lines = [line for line in rest.splitlines() if line.startswith("{")]
    assert lines, f"no report from subscribe.mjs (exit {node.returncode}):\n{rest}\n{errors}"
    report: dict[str, Any] = json.loads(lines[-1])
    assert report["ok"], json.dumps(report, indent=1) + errors
    final = report["final"]
    assert final["status"] == "COMPLETE" and final["percent"] == 100 and final["settled"] is True
    assert final["message"] == "complete, 2 of 8 items failed"
    assert report["percents"].count(100) == report["statuses"].count("COMPLETE")  # 100 only once COMPLETE
    assert sorted((f["label"], f["params"]["x"], f["error_type"]) for f in report["failures"]) == [
        ("item 2", 2, "ValueError"), ("item 5", 5, "ValueError")]  # fmt: skip
    assert report["rows"] == 8 and report["owner_listed"] is True
    assert report["snapshots"] >= 3  # the bar moved while the run ran
