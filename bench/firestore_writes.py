"""How many writes a 1,000-item fan-out sends to its Firestore run document.

Firestore sustains about one write per second per document; this replays the
engine's store traffic for a fan-out against the emulator and counts the
commits that reach the run document. Per item, as the durable wrapper makes them (haulage/tasks/):
``load_step_state``, ``start_step``, a progress ``update_run`` (message,
heartbeat), a cost ``update_run``, ``complete_step``, and a percent
``update_run`` each time the whole percent moves; then the finish task's
terminal ``transition``. The items are spread over threads of two
FirestoreStore instances, each standing for one worker process (its own
buffers and flusher), so the two processes also contend for the document.

Run: ``python bench/firestore_writes.py [--items 1000] [--processes 2] [--threads 4]``.
Prints one line; exits 1 if the run document ends wrong or the writes exceed seconds + 5.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haulage.progress.models import (  # noqa: E402
    ACTIVE,
    Checkpoint,
    Event,
    RunRecord,
    RunStatus,
    RunUpdate,
    StepRecord,
    StepStatus,
    cost_increments,
    now,
)
from tests.firestore_support import start_emulator  # noqa: E402

PROJECT = "haulage-bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2, help="worker processes (FirestoreStore instances)")
    parser.add_argument("--threads", type=int, default=4, help="concurrent steps per worker process")
    parser.add_argument("--coalesce", type=float, default=1.0, help="HAULAGE_FIRESTORE_COALESCE_SECONDS")
    args = parser.parse_args()

    host, stop = start_emulator(PROJECT)
    os.environ["FIRESTORE_EMULATOR_HOST"] = host
    try:
        return bench(args.items, args.processes, args.threads, args.coalesce)
    finally:
        stop()


def bench(items: int, processes: int, threads: int, coalesce: float) -> int:
    from haulage.progress.firestore import FirestoreStore

    collection = f"tasks-{uuid.uuid4().hex[:8]}"
    stores = [
        FirestoreStore(project=PROJECT, collection=collection, coalesce_seconds=coalesce) for _ in range(processes)
    ]
    run_id = uuid.uuid4().hex
    started = time.monotonic()

    # The start of the run: the API creates it, the first stage's task marks it PROCESSING.
    first = stores[0]
    first.create_run(RunRecord(id=run_id, workflow="review_plan", created_by="bench@example.com"))
    started_event = Event(now(), "started", "run started")
    first.transition(
        run_id,
        RunStatus.PROCESSING,
        allowed_from={RunStatus.PENDING},
        update=RunUpdate(set={"started_at": now()}, events=[started_event]),
    )
    first.put_checkpoint(run_id, Checkpoint("1", "fan_out", {"count": items}))
    fan_out_event = Event(now(), "fan-out", f"fan-out over {items} item(s)", "1")
    first.update_run(run_id, RunUpdate(incr={"steps.total": items}, events=[fan_out_event]))

    next_item = itertools.count()
    finished = itertools.count(1)
    errors: list[BaseException] = []

    def worker(store: FirestoreStore) -> None:
        try:
            while (i := next(next_item)) < items:
                key = f"1:analyze_page[{i}]"
                status, cps = store.load_step_state(run_id, [key])
                assert status is RunStatus.PROCESSING and not cps
                running = StepRecord(key, "analyze_page", StepStatus.RUNNING, task_id=f"t{i}")
                assert store.start_step(run_id, running, RunUpdate(set={"heartbeat": now()})) is None
                store.update_run(run_id, RunUpdate(set={"message": f"page {i}: matching", "heartbeat": now()}))
                store.update_run(run_id, RunUpdate(incr=cost_increments("model-x.1", usd=0.002, input_tokens=900,
                                                                        output_tokens=120, calls=1)))  # fmt: skip
                done = StepRecord(key, "analyze_page", StepStatus.COMPLETE, percent=100.0, task_id=f"t{i}")
                store.complete_step(run_id, Checkpoint(key, "analyze_page", {"page": i, "findings": 3}), done,
                                    RunUpdate(incr={"steps.done": 1}, set={"heartbeat": now()}))  # fmt: skip
                n = next(finished)
                # tasks/records.py writes the percent only when its whole number moves.
                if int(100 * n / items) != int(100 * (n - 1) / items):
                    store.update_run(run_id, RunUpdate(maximum={"percent": round(100 * n / items, 1)}))
        except BaseException as exc:  # reported below; a bench thread must not die silently
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(s,)) for s in stores for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]

    # The finish task, on whichever worker: the result checkpoint and the terminal transition.
    last = stores[-1]
    last.put_checkpoint(run_id, Checkpoint("__result__", "__result__", {"successes": items}))
    ended = last.transition(run_id, RunStatus.COMPLETE, allowed_from=ACTIVE,
                            update=RunUpdate(set={"result": {"successes": items, "failed": 0}, "percent": 100.0,
                                                  "message": "complete", "finished_at": now()},
                                             events=[Event(now(), "complete", "complete")]))  # fmt: skip
    run_seconds = time.monotonic() - started
    # The workers stay up: their background writers send what they still buffer, at the paced rate.
    deadline = time.monotonic() + 60
    while any(s.buffered(run_id) for s in stores) and time.monotonic() < deadline:
        time.sleep(0.05)
    seconds = time.monotonic() - started
    for store in stores:
        store.close()

    writes = sum(s.writes[run_id] for s in stores)  # close() found nothing left to write
    conflicts = sum(s.conflicts[run_id] for s in stores)
    run = FirestoreStore(project=PROJECT, collection=collection).get_run(run_id)
    assert run is not None
    correct = (
        ended
        and run.status is RunStatus.COMPLETE
        and run.steps.done == items
        and run.cost["model-x.1"].calls == items
        and run.message == "complete"
        and run.percent == 100.0
        and run.history[-1].kind == "complete"
    )
    within = writes <= seconds + 5
    print(
        f"items={items} run_seconds={run_seconds:.2f} seconds_until_all_written={seconds:.2f} "
        f"run_document_writes={writes} (conflicts={conflicts}, "
        f"{processes} processes x {threads} threads, coalesce={coalesce:g}s) writes<=seconds+5: "
        f"{'yes' if within else 'NO'}; final document {'correct' if correct else 'WRONG: ' + repr(run)}"
    )
    return 0 if within and correct else 1


if __name__ == "__main__":
    sys.exit(main())
