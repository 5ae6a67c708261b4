"""What users see: live subscriptions, the CLI progress bar on both stores, and the Firestore rules."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from haulage.workflows import RunStatus, registry
from tests.conftest import ROOT, WorkerProcess

pytestmark = pytest.mark.timeout(120)


def test_watch_yields_each_change_until_the_end(worker: WorkerProcess) -> None:
    run = registry.get("t_progress").start(stages=5, pause=0.2)
    seen = list(run.watch(timeout=30))
    assert seen[-1].status is RunStatus.COMPLETE and seen[-1].percent == 100.0
    percents = [r.percent for r in seen]
    assert percents == sorted(percents)  # never backwards
    messages = {r.message for r in seen}
    assert {"stage 2 of 5", "stage 4 of 5"} <= messages  # intermediate states arrived live
    assert len(seen) >= 5


def test_watch_times_out(redis_server: str) -> None:
    from haulage.progress import get_store
    from haulage.progress.models import RunRecord
    from haulage.workflows import WaitTimeout, get_run

    record = RunRecord(id=uuid.uuid4().hex, workflow="t_chain")
    get_store().create_run(record)
    with pytest.raises(WaitTimeout):
        list(get_run(record.id).watch(timeout=0.5))


@pytest.fixture
def firestore_env(redis_server: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A world whose runs live in Firestore: its own broker database and workers."""
    from tests.firestore_support import TEST_PROJECT, session_emulator

    host = session_emulator()
    env = {
        "HAULAGE_REDIS_URL": redis_server.rsplit("/", 1)[0] + "/1",
        "HAULAGE_STORE": "firestore",
        "FIRESTORE_EMULATOR_HOST": host,
        "HAULAGE_FIRESTORE_PROJECT": TEST_PROJECT,
        "HAULAGE_FIRESTORE_COLLECTION": f"runs-{uuid.uuid4().hex[:8]}",
        "HAULAGE_MODULES": "tests.flows,haulage.examples",
    }
    worker = WorkerProcess(tmp_path / "fs-worker.log", extra_env=env)
    worker.start()
    yield env
    worker.stop()


def test_cli_progress_bar_on_firestore(firestore_env: dict[str, str]) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "haulage.cli",
            "run",
            "t_progress",
            "-p",
            "stages=6",
            "-p",
            "pause=0.4",
            "--watch",
            "--created-by",
            "ana@example.com",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **firestore_env},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    bars = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(bars) >= 3, out.stdout  # the bar moved while the run ran
    assert "100.0% COMPLETE" in bars[-1] and "steps 2/2" in bars[-1] and "$0.0100" in bars[-1]
    # Writes are coalesced to one a second, so not every message shows; some intermediate ones must.
    assert any("PROCESSING" in b and "of 6" in b for b in bars), bars
    run_id = out.stdout.split()[1]

    from google.cloud import firestore

    client = firestore.Client(project=firestore_env["HAULAGE_FIRESTORE_PROJECT"])
    doc = client.collection(firestore_env["HAULAGE_FIRESTORE_COLLECTION"]).document(run_id).get().to_dict()
    assert doc["status"] == "COMPLETE" and doc["created_by"] == "ana@example.com"
    assert doc["steps"] == {"total": 2, "done": 2, "failed": 0}
    assert doc["cost"]["test-model"]["calls"] == 1
    assert hasattr(doc["updated_ts"], "timestamp")  # a server timestamp a frontend can order by
    assert doc["history"][-1]["kind"] == "complete"


def _token(uid: str, project: str, email: str | None = None) -> str:
    """An unsigned Firebase ID token: the emulator's rules engine accepts these."""

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    claims = {
        "sub": uid,
        "user_id": uid,
        "aud": project,
        "iss": f"https://securetoken.google.com/{project}",
        "iat": 1,
        "exp": 9999999999,
        "auth_time": 1,
        "firebase": {"sign_in_provider": "password"},
    }
    if email:
        claims["email"] = email
        claims["email_verified"] = True  # the rules take an email as ownership only when verified
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


def _get(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - loopback emulator
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _patch(url: str, token: str) -> int:
    body = json.dumps({"fields": {"status": {"stringValue": "COMPLETE"}}}).encode()
    request = urllib.request.Request(
        url, data=body, method="PATCH", headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_security_rules_owner_reads_others_refused(tmp_path: Path) -> None:
    from haulage.devtools.firestore_emulator import SHIPPED_RULES, EmulatorMissing, start_emulator

    project = "haulage-rules"
    try:
        host, stop = start_emulator(project, rules=SHIPPED_RULES, log_path=tmp_path / "fs.log")
    except EmulatorMissing as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Firestore emulator missing in CI: {exc}")
        pytest.skip(f"Firestore emulator not installed: {exc}")
    try:
        os.environ["FIRESTORE_EMULATOR_HOST"] = host
        from google.cloud import firestore

        admin = firestore.Client(project=project)  # the emulator's admin path: rules do not apply
        run = admin.collection("tasks").document("run1")
        run.set({"status": "PROCESSING", "created_by": "owner-uid", "percent": 40})
        run.collection("steps").document("0:a").set({"status": "COMPLETE"})
        run.collection("checkpoints").document("0:a").set({"value": "secret"})
        admin.collection("tasks").document("run2").set({"status": "COMPLETE", "created_by": "ana@example.com"})
        base = f"http://{host}/v1/projects/{project}/databases/(default)/documents/tasks"
        owner, outsider = _token("owner-uid", project), _token("someone-else", project)
        assert _get(f"{base}/run1", owner) == 200
        assert _get(f"{base}/run1/steps/0:a", owner) == 200
        assert _get(f"{base}/run1", outsider) == 403
        assert _get(f"{base}/run1/steps/0:a", outsider) == 403
        assert _get(f"{base}/run1", None) == 403  # anonymous
        assert _get(f"{base}/run1/checkpoints/0:a", owner) == 403  # engine state is never exposed
        assert _patch(f"{base}/run1", owner) == 403  # clients write nothing
        assert _get(f"{base}/run2", _token("uid-ana", project, email="ana@example.com")) == 200  # owner by email
    finally:
        os.environ.pop("FIRESTORE_EMULATOR_HOST", None)
        stop()
