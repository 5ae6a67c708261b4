"""Write coalescing on a real run: a 1,000-item fan-out through real workers, on the Firestore emulator.

    python -m bench.firestore_run [--items 1000]

Starts a redis-server, the Firestore emulator and one prefork worker (2
processes) with HAULAGE_STORE=firestore, runs the fan-out, then stops the
worker: each pool process records how many writes it sent to the run document
(bench/flows.py), and this process adds its own. Prints the run's seconds, the
writes to its document, and whether writes <= seconds + 5 (Firestore's
sustained rate for one document is about one write a second).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haulage.devtools.firestore_emulator import start_emulator  # noqa: E402
from haulage.devtools.redis_server import free_port, start_redis  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="haulage-fsrun-"))
    port = free_port()
    host, stop_emulator = start_emulator("haulage-bench", log_path=tmp / "emulator.log")
    os.environ.update({
        "HAULAGE_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "HAULAGE_MODULES": "bench.flows",
        "HAULAGE_STORE": "firestore",
        "FIRESTORE_EMULATOR_HOST": host,
        "HAULAGE_FIRESTORE_PROJECT": "haulage-bench",
        "HAULAGE_FIRESTORE_COLLECTION": f"bench-{uuid.uuid4().hex[:8]}",
    })  # fmt: skip
    redis_proc = start_redis(tmp / "redis", port, appendonly=True)
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - handed to the child, closed at exit
    worker = subprocess.Popen(
        [sys.executable, "-m", "haulage.cli", "worker", "--queues", "short", "--concurrency", "2",
         "--hostname", "fsbench@127.0.0.1", "--loglevel", "WARNING"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        from haulage.progress import get_store
        from haulage.redis_client import get_redis
        from haulage.tasks.app import app
        from haulage.workflows import RunStatus, registry

        registry.load_modules()
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=["fsbench@127.0.0.1"], timeout=0.5):
            if time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start; see {tmp / 'worker.log'}")
        began = time.monotonic()
        run = registry.get("bench_fan_out").start(items=args.items)
        record = run.wait(timeout=600, poll=0.05)
        seconds = time.monotonic() - began
        assert record.status is RunStatus.COMPLETE, record.error
        os.kill(worker.pid, signal.SIGTERM)  # warm shutdown: the pool processes report their writes
        worker.wait(60)
        store = get_store()
        store.flush()  # type: ignore[attr-defined]
        ours = store.writes[run.id]  # type: ignore[attr-defined]
        theirs = {int(pid): int(n) for pid, n in get_redis().hgetall(f"bench:fswrites:{run.id}").items()}
        writes = ours + sum(theirs.values())
        final = store.get_run(run.id)
        assert final is not None and final.steps.done == args.items, final
        ok = writes <= seconds + 5
        verdict = "yes" if ok else "NO"
        print(f"items={args.items} run_seconds={seconds:.2f} run_document_writes={writes} "
              f"(this process {ours}, worker processes {sorted(theirs.values())}) "
              f"writes<=seconds+5: {verdict}; final document: COMPLETE, {final.steps.done} done")  # fmt: skip
        return 0 if ok else 1
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        redis_proc.terminate()
        redis_proc.wait(10)
        stop_emulator()
        log.close()


if __name__ == "__main__":
    raise SystemExit(main())
