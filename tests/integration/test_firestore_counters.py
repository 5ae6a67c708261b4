"""On the Firestore store, a fan-out's total survives a kill of the process that counted it.

Progress counters are coalesced in the process that reports them; the total a
fan-out adds is what finishing and recovery compare the done counts against,
so it is written at once. A process killed right after the expansion (SIGKILL:
no exit hook runs) must leave it in the run document.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from haulage.progress.models import RunRecord, StepCounts
from tests.conftest import ROOT
from tests.firestore_support import TEST_PROJECT, session_emulator

pytestmark = pytest.mark.timeout(120)

KILLED_AFTER_EXPANSION = """
import os, signal, sys
from haulage.progress.firestore import FirestoreStore
from haulage.progress.models import Event, RunUpdate, now

store = FirestoreStore(project=sys.argv[1], collection=sys.argv[2])
store.update_run(sys.argv[3], RunUpdate(incr={"steps.total": 80}, events=[Event(now(), "fan-out", "80 items", "s1")]))
store.update_run(sys.argv[3], RunUpdate(incr={"steps.done": 1}))  # an item's progress: buffered, may be lost
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def collection() -> Iterator[str]:
    session_emulator()
    yield f"tasks-{uuid.uuid4().hex[:12]}"


def test_a_fan_outs_total_is_written_before_a_kill_can_lose_it(collection: str) -> None:
    from haulage.progress.firestore import FirestoreStore  # the optional extra, as the store tests import it

    reader = FirestoreStore(project=TEST_PROJECT, collection=collection)
    run = RunRecord(id=uuid.uuid4().hex, workflow="wf", steps=StepCounts(total=1))
    reader.create_run(run)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_EXPANSION, TEST_PROJECT, collection, run.id],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    record = reader.get_run(run.id)
    assert record is not None
    assert record.steps.total == 81, record.steps
    assert any(e.kind == "fan-out" for e in record.history)
    reader.close()
