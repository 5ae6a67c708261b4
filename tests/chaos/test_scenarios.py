"""The chaos scenarios of issue 11 on the settings a user gets, each a row of the README's "Chaos results".

Every scenario runs ``chaos_fan_out`` (tests/chaos/scenario_flows.py: CPU work
per item, one ``ctx.once`` effect per item counted in a side table) on a world
of its own (tests/chaos/world.py: its own Redis with its append-only file,
``haulage`` subprocesses with no ``HAULAGE_*`` tuning), kills things with
SIGKILL, never calls resume, and asserts the targets through
:func:`tests.chaos.report.record`: no lost item, no duplicated and no lost
guarded effect, no resume, each run over within 30 s of the last fault.

A step may die at most ``HAULAGE_CRASH_RETRIES`` (3) times before it fails
with ``WorkerLost``, by design; the killers spare a step they already hit
twice, so a row counts recoveries, not poison steps.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from haulage.devtools.redis_server import free_port
from haulage.progress.models import RunStatus
from tests.chaos.report import record
from tests.chaos.world import MODULES, World
from tests.conftest import ROOT, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

#: SIGKILLs a killer allows itself per step: one short of the crash budget, with a margin for kills it cannot see
PER_STEP = 2


@pytest.fixture
def side_url(redis_server: str) -> str:
    """The session's Redis (db 3) holds what the scenarios count: no scenario kills it."""
    return redis_server.rsplit("/", 1)[0] + "/3"


@pytest.fixture
def world(tmp_path: Path, side_url: str) -> Iterator[World]:
    w = World(tmp_path, side_url)
    yield w
    w.close()


@pytest.fixture
def firestore_world(tmp_path: Path, side_url: str) -> Iterator[World]:
    from tests.firestore_support import TEST_PROJECT, session_emulator

    host = session_emulator()
    collection = f"chaos-{uuid.uuid4().hex[:8]}"
    # Imported here: google-cloud-firestore is an optional extra.
    from haulage.progress.firestore import FirestoreStore

    store = FirestoreStore(project=TEST_PROJECT, collection=collection)
    env = {"HAULAGE_STORE": "firestore", "FIRESTORE_EMULATOR_HOST": host, "HAULAGE_FIRESTORE_PROJECT": TEST_PROJECT,
           "HAULAGE_FIRESTORE_COLLECTION": collection}  # fmt: skip
    w = World(tmp_path, side_url, store=store, store_env=env)
    yield w
    w.close()
    store.close()


def kill_pool_children(world: World, run_id: str, kills: int, rng: random.Random, hit: Counter[str],
                       pause: float = 0.15) -> float:  # fmt: skip
    """SIGKILL ``kills`` pool processes while they run an item's body; returns when the last kill was sent."""
    sent, last = 0, time.monotonic()
    deadline = time.monotonic() + 120
    while sent < kills:
        assert time.monotonic() < deadline, f"only {sent} of {kills} kills found a step to hit"
        running = world.running(run_id)
        pool = {pid for w in world.workers if w.alive() for pid in w.children()}
        targets = [pid for pid, key in running.items() if pid in pool and hit[key] < PER_STEP]
        if not targets:
            time.sleep(0.05)
            continue
        pid = rng.choice(targets)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        hit[running[pid]] += 1
        sent, last = sent + 1, time.monotonic()
        time.sleep(pause)
    return last


def kill_whole_workers(world: World, run_id: str, kills: int, hit: Counter[str], min_age: float = 2.5) -> float:
    """SIGKILL whole workers (main process and pool) in turn while they run items, starting each again at once."""
    sent, last = 0, time.monotonic()
    deadline = time.monotonic() + 150
    while sent < kills:
        assert time.monotonic() < deadline, f"only {sent} of {kills} whole-worker kills found a worker to hit"
        victim = world.workers[sent % len(world.workers)]
        running = world.running(run_id)
        mine = {pid: key for pid, key in running.items() if pid in victim.children()}
        if time.monotonic() - victim.started_at < min_age or not mine or any(hit[k] >= PER_STEP for k in mine.values()):
            time.sleep(0.05)
            continue
        victim.kill()
        for key in mine.values():
            hit[key] += 1
        sent, last = sent + 1, time.monotonic()
        world.restart(victim)
    return last


def run_fan_out(world: World, n: int, seconds: float) -> str:
    run_id = world.start_run("chaos_fan_out", n=n, seconds=seconds)
    wait_until(lambda: world.running(run_id), timeout=60, what="the first items to run")
    return run_id


def finish(world: World, scenario: str, store: str, run_id: str, n: int, kills: int, last_fault: float) -> None:
    record_ = world.wait_end(run_id, timeout=120)
    ended = time.monotonic()
    assert record_.status is RunStatus.COMPLETE, record_.error
    record(world.row(scenario, store, [run_id], n, kills, last_fault, ended))


def pool_children_scenario(world: World, store: str, n: int, kills: int) -> None:
    for _ in range(2):
        world.add_worker(concurrency=2)
    run_id = run_fan_out(world, n, seconds=0.05)
    last = kill_pool_children(world, run_id, kills, random.Random(11), Counter())
    finish(world, "pool processes SIGKILLed mid-item", store, run_id, n, kills, last)


def whole_worker_scenario(world: World, store: str, n: int, kills: int) -> None:
    for _ in range(3):
        world.add_worker(concurrency=2)
    run_id = run_fan_out(world, n, seconds=0.08)
    last = kill_whole_workers(world, run_id, kills, Counter())
    finish(world, "whole workers SIGKILLed and restarted", store, run_id, n, kills, last)


def test_pool_children_sigkilled_redis(world: World) -> None:
    pool_children_scenario(world, "redis", n=240, kills=48)


def test_whole_workers_sigkilled_redis(world: World) -> None:
    whole_worker_scenario(world, "redis", n=240, kills=12)


def test_pool_children_and_workers_sigkilled_firestore(firestore_world: World) -> None:
    for _ in range(3):
        firestore_world.add_worker(concurrency=2)
    run_id = run_fan_out(firestore_world, 150, seconds=0.05)
    hit: Counter[str] = Counter()
    kill_pool_children(firestore_world, run_id, 10, random.Random(5), hit)
    last = kill_whole_workers(firestore_world, run_id, 4, hit)
    finish(firestore_world, "pool processes and whole workers SIGKILLed", "firestore", run_id, 150, 14, last)


def reached(world: World, run_id: str, target: int) -> bool:
    return world.done(run_id) >= target


def test_redis_sigkilled_and_restarted_mid_run(world: World) -> None:
    for _ in range(2):
        world.add_worker(concurrency=2)
    n = 200
    run_id = run_fan_out(world, n, seconds=0.05)
    last, restarts = 0.0, 3
    for i in range(restarts):
        target = (i + 1) * n // (restarts + 2)
        wait_until(functools.partial(reached, world, run_id, target), timeout=90, interval=0.1,
                   what=f"{target} items done")  # fmt: skip
        world.kill_redis()
        last = time.monotonic()
    finish(world, "redis-server SIGKILLed, restarted from its AOF", "redis", run_id, n, restarts, last)


DEV_TOKEN = "chaos-dev-token-0123456789"


def _post(port: int, path: str, body: dict[str, Any], timeout: float = 10) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {DEV_TOKEN}",
                                                      "Content-Type": "application/json"})  # fmt: skip
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def _stream_until_cut(port: int, run_id: str, out: list[str]) -> None:
    """Read a run's event stream until the server goes away (or the run ends); keep what arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"/v1/runs/{run_id}/events", headers={"Authorization": f"Bearer {DEV_TOKEN}"})
        response = conn.getresponse()
        while line := response.readline():
            out.append(line.decode(errors="replace"))
    except (OSError, http.client.HTTPException):
        out.append("<cut>")
    finally:
        conn.close()


def test_api_sigkilled_mid_start_and_mid_stream(world: World) -> None:
    """Keyed starts race SIGKILLs of the API: each key ends as exactly one run that completes, and a retry names it."""
    for _ in range(2):
        world.add_worker(concurrency=2)
    port = free_port()
    world.env.update(HAULAGE_API_AUTH="dev", HAULAGE_API_DEV_TOKEN=DEV_TOKEN, HAULAGE_API_PORT=str(port))
    api = world.spawn(["api"], "api")
    keys, n, kills, rng = [f"key-{i}" for i in range(24)], 8, 15, random.Random(3)
    accepted: dict[str, set[str]] = {k: set() for k in keys}
    streams: list[list[str]] = []
    followed: list[str] = []
    refused: list[tuple[str, int, dict[str, Any]]] = []
    body = {"params": {"n": n, "seconds": 0.02}}
    last = time.monotonic()
    for kill in range(kills + 1):
        wait_until(lambda: _ready(port), timeout=60, interval=0.1, what="the API to answer")
        if not followed:  # a longer run that clients follow live while the API dies under them
            status, answer = _post(port, "/v1/workflows/chaos_fan_out/runs",
                                   {"params": {"n": 160, "seconds": 0.05}, "idempotency_key": "followed"})  # fmt: skip
            assert status == 202, answer
            followed.append(answer["run_id"])
        streams.append([])
        threading.Thread(target=_stream_until_cut, args=(port, followed[0], streams[-1]), daemon=True).start()

        def start(key: str) -> None:
            try:
                status, answer = _post(port, "/v1/workflows/chaos_fan_out/runs", {**body, "idempotency_key": key})
            except (OSError, http.client.HTTPException):
                return  # cut off by the kill: the client tries again with the same key
            if status != 202:
                refused.append((key, status, answer))  # asserted below: a thread's assert would be a warning
                return
            accepted[key].add(answer["run_id"])

        # Every key again (those accepted too: a retried keyed start must name the same run), all at once.
        threads = [threading.Thread(target=start, args=(k,), daemon=True) for k in keys]
        for t in threads:
            t.start()
        if kill == kills:  # the last round is not cut: every key must be answered
            for t in threads:
                t.join(30)
            break
        time.sleep(rng.uniform(0.0, 0.4))
        api.kill()
        last = time.monotonic()
        for t in threads:
            t.join(15)
        api.start()
    assert not refused, refused
    assert all(len(ids) == 1 for ids in accepted.values()), {k: v for k, v in accepted.items() if len(v) != 1}
    run_ids = [next(iter(accepted[k])) for k in keys]
    ended = 0.0
    for run_id in run_ids:
        record_ = world.wait_end(run_id, timeout=120)
        ended = max(ended, time.monotonic())
        assert record_.status is RunStatus.COMPLETE, (run_id, record_.status, record_.error)
    # No half-created run: the store holds exactly the keyed runs, and each of them completed (above).
    listed = {r.id for r in world.store.list_runs(workflow="chaos_fan_out", limit=1000)}
    assert listed == {*run_ids, *followed}, listed ^ {*run_ids, *followed}
    followed_end = world.wait_end(followed[0], timeout=120)
    ended = max(ended, time.monotonic())
    assert followed_end.status is RunStatus.COMPLETE, followed_end.error
    final: list[str] = []
    _stream_until_cut(port, followed[0], final)  # a client reconnecting after the kills sees the end
    assert any(line.startswith("event: end") for line in final), final[-5:]
    cut = sum(1 for s in streams if s and s[-1] == "<cut>")
    assert cut >= 1, "no stream was cut by a kill: the scenario did not kill the API mid-stream"
    rows = world.row("HTTP API SIGKILLed mid-start and mid-stream", "redis", run_ids, n, kills, last, ended,
                     notes=f"{len(keys)} keyed starts retried after each kill; {cut} live streams cut")  # fmt: skip
    followed_row = world.row("", "redis", followed, 160, 0, last, ended)
    for name in ("lost_items", "duplicated_effects", "lost_effects", "unknown_redos", "recoveries"):
        setattr(rows, name, getattr(rows, name) + getattr(followed_row, name))
    rows.items += followed_row.items
    record(rows)


def _ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


CLOUD_TOKEN = "chaos-cloudrun-token-0123456789"
CLOUD_JOB = "projects/haulage-test/locations/local/jobs/haulage-step"


def test_dispatch_worker_sigkilled_while_polling_cloud_run(tmp_path: Path, side_url: str) -> None:
    """Whole dispatch workers die while they poll Cloud Run executions: each step re-attaches, none runs twice."""
    from haulage.devtools.local_cloudrun import LocalCloudRun
    from haulage.devtools.stack import job_settings
    from haulage.dispatch.cloudrun import env_of
    from haulage.dispatch.job_config import CONFIG_ENV, write_job_config, write_key_file

    world = World(tmp_path, side_url)
    key = write_key_file(tmp_path / "handoff-key")
    config = write_job_config(tmp_path / "job.json", settings=job_settings(world.env), python_path=[str(ROOT)],
                              handoff_key_file=key, keep_env=["CHAOS_SIDE_URL"])  # fmt: skip
    server = LocalCloudRun(jobs={"haulage-step": None}, cwd=ROOT, log_dir=tmp_path / "cloudrun", token=CLOUD_TOKEN,
                           task_env={CONFIG_ENV: str(config), "CHAOS_SIDE_URL": side_url})  # fmt: skip
    server.start(port=0)
    try:
        # Only where Cloud Run is: poll interval, call timeout and deadline margin are the defaults.
        world.env.update(HAULAGE_DISPATCH_MODE="cloudrun", HAULAGE_CLOUDRUN_ENDPOINT=server.address,
                         HAULAGE_CLOUDRUN_TOKEN=CLOUD_TOKEN, HAULAGE_HANDOFF_KEY_FILE=str(key),
                         HAULAGE_CLOUDRUN_JOB=CLOUD_JOB)  # fmt: skip
        for _ in range(2):
            world.add_worker(concurrency=2)
        n, kills = 8, 6
        run_id = world.start_run("chaos_cloud_fan_out", n=n, seconds=12.0)

        def polling() -> bool:  # executions started, and their drivers hold their next poll
            return len([e for e in server.executions() if env_of(e).get("HAULAGE_RUN_ID") == run_id]) > 0

        wait_until(polling, timeout=60, interval=0.1, what="Cloud Run executions of the run")
        last = time.monotonic()
        for kill in range(kills):
            victim = world.workers[kill % len(world.workers)]
            world.wait_ready(victim)
            time.sleep(1.0)  # it has taken up polls of the executions (its own, or those the sweep gave back)
            victim.kill()
            last = time.monotonic()
            world.restart(victim)
        record_ = world.wait_end(run_id, timeout=120)
        ended = time.monotonic()
        assert record_.status is RunStatus.COMPLETE, record_.error
        executions = [e for e in server.executions() if env_of(e).get("HAULAGE_RUN_ID") == run_id]
        per_step = Counter(env_of(e).get("HAULAGE_STEP_KEY") for e in executions)
        assert {s.backend for s in world.store.list_steps(run_id) if "chaos_long" in s.key} == {"cloudrun"}
        # A redelivered driver re-attaches to the recorded execution: one execution per step.
        assert set(per_step.values()) == {1} and len(per_step) == n, per_step
        record(world.row("dispatch workers SIGKILLed while polling Cloud Run", "redis", [run_id], n, kills, last,
                         ended, notes=f"{len(executions)} executions for {n} steps"))  # fmt: skip
    finally:
        server.stop()
        world.close()


def test_beat_sigkilled_and_restarted(tmp_path: Path, side_url: str) -> None:
    """Beat killed right after it fired, and again while its successors wait for the dead one's lock.

    One run per tick (the tick names the run); no tick is skipped while a beat
    holds the lock. While nobody holds it (RedBeat's lock outlives a SIGKILLed
    beat by up to ``redbeat_lock_timeout``, 30 s) nothing fires, and the first
    firing after makes one run for the current tick, not one per tick missed:
    the test measures that gap and reports the ticks it skipped.
    """
    from tests.chaos.beat_flows import EVERY

    world = World(tmp_path, side_url, modules=f"{MODULES},tests.chaos.beat_flows")
    try:
        world.add_worker(concurrency=2)
        beat = world.spawn(["beat", "--loglevel", "INFO"], "beat")

        def fired() -> int:
            return beat.log.read_text(errors="replace").count("Sending due task workflow:chaos_tick")

        wait_until(lambda: fired() >= 3, timeout=60, interval=0.1, what="three ticks fired")
        before = fired()
        wait_until(lambda: fired() > before, timeout=10, interval=0.01, what="the next firing")
        beat.kill()  # mid-tick: the firing published, RedBeat's record of it maybe not yet saved
        holder_killed, last_wall = time.monotonic(), time.time()
        fired_at_kill, kills = fired(), 1
        beat.start()
        for _ in range(5):  # mid-start: each successor killed while it waits for the dead beat's lock
            time.sleep(1.0)
            beat.kill()
            last_wall, kills = time.time(), kills + 1
            beat.start()
        wait_until(lambda: fired() > fired_at_kill, timeout=60, interval=0.1, what="a firing after the kills")
        gap = time.monotonic() - holder_killed
        back = fired()
        wait_until(lambda: fired() >= back + 3, timeout=30, interval=0.1, what="ticks after the recovery")
        beat.stop()
        runs = world.store.list_runs(workflow="chaos_tick", limit=1000)
        for run in runs:
            world.wait_end(run.id, timeout=60)
        runs = world.store.list_runs(workflow="chaos_tick", limit=1000)
        per_tick = Counter(int(str(r.idempotency_key).rsplit(":", 1)[1]) for r in runs)
        assert set(per_tick.values()) == {1}, per_tick  # never two runs for one tick
        ticks = sorted(per_tick)
        gaps = [(a, b) for a, b in zip(ticks, ticks[1:], strict=False) if b - a > 1]
        # Skipped ticks only across the one window in which no beat held the lock.
        assert len(gaps) <= 1, gaps
        skipped = sum(b - a - 1 for a, b in gaps)
        assert skipped * EVERY <= gap + EVERY, (skipped, gap)
        # The fault's end: the first scheduled run after the last kill has finished.
        first_after = min((r for r in runs if r.created_at > last_wall), key=lambda r: r.created_at)
        assert first_after.finished_at is not None
        seconds = first_after.finished_at - last_wall
        notes = (
            f"{len(runs)} scheduled runs, 1 per tick; next firing {gap:.0f}s after the lock holder's kill; "
            f"{skipped} ticks of that window never fired (RedBeat's lock, 30 s): target 'none missed' not met"
        )
        row = world.row("beat SIGKILLed mid-tick and mid-start, restarted", "redis", [r.id for r in runs], 2, kills,
                        0.0, seconds, notes=notes)  # fmt: skip
        record(row)
    finally:
        world.close()


def test_a_message_lost_with_redis_is_sent_again_after_the_restart(world: World) -> None:
    """kombu pops a message before it records it as unacked; a Redis dying between the two loses it.

    Reproduced exactly: the run's first message is taken off its queue (as BRPOP would), then Redis is
    SIGKILLed and restarted. The workers notice the restart and re-send the run that stopped moving,
    well before HAULAGE_STALE_AFTER (600 s), with no manual resume.
    """
    first = world.add_worker(concurrency=1)
    server_seen = "haulage:turn:redis-server"
    wait_until(lambda: world.r.exists(server_seen), timeout=30, what="the sweep to note Redis's server id")
    first.kill()
    run_id = world.start_run("chaos_fan_out", n=4, seconds=0.05)
    queues = [k for k in world.r.keys("*") if world.r.type(k) == b"list" and world.r.llen(k)]
    assert queues, "the run's first message should be waiting on a queue"
    for queue in queues:
        world.r.delete(queue)  # the message is now only "in a worker's memory": lost with the restart
    world.kill_redis()
    last = time.monotonic()
    world.add_worker(concurrency=2)
    record_ = world.wait_end(run_id, timeout=90)
    ended = time.monotonic()
    assert record_.status is RunStatus.COMPLETE, record_.error
    assert any("Redis restarted" in e.message for e in record_.history if e.kind == "resumed"), record_.history
    record(world.row("a message popped but not recorded when Redis died", "redis", [run_id], 4, 1, last, ended))
