"""The coordination contract: every implementation of the seam must pass these, unchanged.

Parametrized over the implementations (only Redis so far); each test works on
fresh run ids, so the suite shares one server with the other tests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from haulage.coordination import Coordination, FanInEntry, Handoff, LockGrant
from haulage.coordination.redis_coordination import RedisCoordination
from haulage.errors import LockUnavailable
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)

#: seconds of liveness in these tests: short, so that a lapse is quick to wait for
LIVENESS = 0.3
#: seconds of lock TTL: far above LIVENESS, so a take-over can only come from a lapsed liveness
TTL = 30.0


def _redis(request: pytest.FixtureRequest) -> Coordination:
    return RedisCoordination(redis.Redis.from_url(request.getfixturevalue("redis_server")))


def _unreachable_redis(request: pytest.FixtureRequest) -> Coordination:
    return RedisCoordination(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))


#: implementation name -> (a working instance, one whose backend cannot answer)
IMPLEMENTATIONS: dict[str, tuple[Callable[[pytest.FixtureRequest], Coordination], ...]] = {
    "redis": (_redis, _unreachable_redis),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def coordination(impl: str, request: pytest.FixtureRequest) -> Coordination:
    return IMPLEMENTATIONS[impl][0](request)


@pytest.fixture
def unreachable(impl: str, request: pytest.FixtureRequest) -> Coordination:
    return IMPLEMENTATIONS[impl][1](request)


def new_id() -> str:
    return uuid.uuid4().hex


def acquire(c: Coordination, run_id: str, token: str, *, liveness: float = LIVENESS, step: str = "0:s") -> LockGrant:
    return c.acquire_lock(run_id, step, token, ttl_seconds=TTL, liveness_seconds=liveness)


# --- step locks ----------------------------------------------------------


def test_lock_is_exclusive_and_released_only_by_its_holder(coordination: Coordination) -> None:
    run_id, a, b = new_id(), new_id(), new_id()
    assert acquire(coordination, run_id, a, liveness=TTL) is LockGrant.ACQUIRED
    assert acquire(coordination, run_id, b) is LockGrant.REFUSED
    assert acquire(coordination, run_id, a, liveness=TTL) is LockGrant.REFUSED  # not re-entrant either
    assert coordination.release_lock(run_id, "0:s", b).released is False  # not the holder: the lock stays
    assert acquire(coordination, run_id, b) is LockGrant.REFUSED
    assert coordination.release_lock(run_id, "0:s", a).released is True
    assert acquire(coordination, run_id, b) is LockGrant.ACQUIRED  # free again, so not a take-over
    assert coordination.release_lock(run_id, "0:s", b).released is True


def test_locks_of_other_steps_and_runs_are_independent(coordination: Coordination) -> None:
    run_id, other_run = new_id(), new_id()
    assert acquire(coordination, run_id, new_id(), step="0:s") is LockGrant.ACQUIRED
    assert acquire(coordination, run_id, new_id(), step="1:t") is LockGrant.ACQUIRED
    assert acquire(coordination, other_run, new_id(), step="0:s") is LockGrant.ACQUIRED


def test_lock_is_taken_over_only_after_the_holders_liveness_lapses(coordination: Coordination) -> None:
    run_id, dead, contender = new_id(), new_id(), new_id()
    assert acquire(coordination, run_id, dead) is LockGrant.ACQUIRED
    started = time.monotonic()

    def beating_for_three_livenesses() -> bool:
        coordination.refresh_liveness(dead, LIVENESS)
        assert acquire(coordination, run_id, contender) is LockGrant.REFUSED  # alive: no take-over
        return time.monotonic() - started > 3 * LIVENESS

    wait_until(beating_for_three_livenesses, timeout=10, interval=LIVENESS / 5, what="three livenesses of beats")
    # The beats stop (the holder was killed): once its liveness lapses, the contender takes over.
    grant = wait_until(lambda: acquire(coordination, run_id, contender) is LockGrant.TAKEN_OVER or None,
                       timeout=10, interval=0.02, what="take-over after the liveness lapsed")  # fmt: skip
    assert grant is True
    # The dead holder, waking, cannot release what is no longer its own.
    assert coordination.release_lock(run_id, "0:s", dead).released is False
    assert acquire(coordination, run_id, new_id()) is LockGrant.REFUSED
    assert coordination.release_lock(run_id, "0:s", contender).released is True


def test_lock_holder_and_its_liveness_are_readable(coordination: Coordination) -> None:
    """What a once-guard asks: who holds this step's lock, and is a claimant still alive."""
    run_id, holder = new_id(), new_id()
    assert coordination.lock_holder(run_id, "0:s") is None
    assert coordination.holder_alive(holder) is False  # never held anything
    assert acquire(coordination, run_id, holder) is LockGrant.ACQUIRED
    assert coordination.lock_holder(run_id, "0:s") == holder
    assert coordination.lock_holder(run_id, "1:t") is None
    assert coordination.holder_alive(holder) is True
    # No beats (killed): the liveness lapses while the lock itself (TTL) is still there.
    wait_until(lambda: not coordination.holder_alive(holder), timeout=10, interval=0.02, what="liveness lapsed")
    assert coordination.lock_holder(run_id, "0:s") == holder
    coordination.refresh_liveness(holder, TTL)
    assert coordination.holder_alive(holder) is True
    coordination.release_lock(run_id, "0:s", holder)
    assert coordination.holder_alive(holder) is False  # a release ends the holder's liveness
    assert coordination.lock_holder(run_id, "0:s") is None


def test_lock_fails_closed_when_the_backend_cannot_answer(unreachable: Coordination) -> None:
    with pytest.raises(LockUnavailable, match="cannot take step lock"):
        acquire(unreachable, new_id(), new_id())


# --- crashes and held deliveries ----------------------------------------


def test_crashes_are_counted_per_run_and_step(coordination: Coordination) -> None:
    run_id, other = new_id(), new_id()
    assert [coordination.count_crash(run_id, "0:s") for _ in range(3)] == [1, 2, 3]
    assert coordination.count_crash(run_id, "1:t") == 1
    assert coordination.count_crash(other, "0:s") == 1
    coordination.purge_run(run_id)
    assert coordination.count_crash(run_id, "0:s") == 1  # purged with the run
    assert coordination.count_crash(other, "0:s") == 2
    coordination.reset_crashes(other)  # a resume: the budget is whole again, for this run only
    assert coordination.count_crash(other, "0:s") == 1
    assert coordination.count_crash(run_id, "0:s") == 2


def test_held_deliveries_lapse_unless_marked_again(coordination: Coordination) -> None:
    mine, theirs, never = new_id(), new_id(), new_id()
    assert coordination.held_deliveries([]) == []
    coordination.hold_deliveries([], LIVENESS)  # a worker holding nothing marks nothing
    coordination.hold_deliveries([mine, theirs], LIVENESS)
    assert coordination.held_deliveries([never, mine, theirs]) == [False, True, True]
    coordination.hold_deliveries([mine], TTL)  # its worker still holds it: marked again
    wait_until(lambda: coordination.held_deliveries([theirs]) == [False], timeout=10, interval=0.02,
               what="the unrefreshed mark lapsed")  # fmt: skip
    assert coordination.held_deliveries([mine, theirs]) == [True, False]


def test_a_turn_goes_to_one_caller_until_it_lapses(coordination: Coordination) -> None:
    name, first, second = new_id(), new_id(), new_id()
    assert coordination.take_turn(name, first, LIVENESS) is True
    assert coordination.take_turn(name, second, LIVENESS) is False
    assert coordination.take_turn(name, first, LIVENESS) is False  # not even its holder twice
    assert coordination.take_turn(new_id(), second, LIVENESS) is True  # another job's turn is its own
    wait_until(lambda: coordination.take_turn(name, second, LIVENESS), timeout=10, interval=0.02,
               what="the turn to lapse and pass on")  # fmt: skip


# --- stage counters ------------------------------------------------------


def test_stage_counters_count_per_run_and_stage_and_on_release(coordination: Coordination) -> None:
    run_id, other_run, token = new_id(), new_id(), new_id()
    assert coordination.count_stage(run_id, 1) == 1
    assert coordination.count_stage(run_id, 1) == 2
    assert coordination.count_stage(run_id, 2) == 1
    assert coordination.count_stage(other_run, 1) == 1
    acquire(coordination, run_id, token)
    released = coordination.release_lock(run_id, "0:s", token, count_stage=1)
    assert released.released is True and released.stage_count == 3  # the same counter, in the same step
    assert coordination.release_lock(run_id, "0:s", token).stage_count is None  # nothing counted
    # A non-holder's release still counts its unit: the unit finished, whoever holds the lock now.
    assert coordination.release_lock(run_id, "0:s", new_id(), count_stage=1).stage_count == 4


# --- fan-in --------------------------------------------------------------


def ok(i: int) -> dict[str, Any]:
    return {"k": f"1:s[{i}]", "ok": 1, "i": i}


def failed(i: int) -> dict[str, Any]:
    return {"k": f"1:s[{i}]", "ok": 0, "i": i, "error_type": "E", "message": "m"}


def test_fan_in_completes_once_when_the_last_item_lands(coordination: Coordination) -> None:
    run_id, rest = new_id(), [{"task": "next"}]
    coordination.fan_in_open(run_id, 1, rest)
    assert coordination.fan_in_continuation(run_id, 1) == rest
    assert coordination.fan_in_add(run_id, 1, {0: ok(0)}, 3, "t0", 30) is False
    assert coordination.fan_in_add(run_id, 1, {0: ok(0)}, 3, "t0b", 30) is False  # a replay does not count twice
    assert coordination.fan_in_add(run_id, 1, {1: failed(1)}, 3, "t1", 30) is False
    assert coordination.fan_in_add(run_id, 1, {2: ok(2)}, 3, "t2", 30) is True  # the last one publishes
    assert coordination.fan_in_add(run_id, 1, {2: ok(2)}, 3, "t2-other", 30) is False  # the lease is t2's
    assert coordination.fan_in_add(run_id, 1, {2: ok(2)}, 3, "t2", 30) is True  # t2 redelivered: still its turn
    coordination.fan_in_continued(run_id, 1)
    assert coordination.fan_in_add(run_id, 1, {2: ok(2)}, 3, "t2", 30) is False  # published: never again
    assert sorted(r["i"] for r in coordination.fan_in_refs(run_id, 1)) == [0, 1, 2]


def test_fan_in_success_replaces_failure_never_the_reverse(coordination: Coordination) -> None:
    run_id = new_id()
    coordination.fan_in_open(run_id, 0, [])
    coordination.fan_in_add(run_id, 0, {0: failed(0), 1: ok(1)}, 3, "x", 30)
    coordination.fan_in_add(run_id, 0, {0: ok(0), 1: failed(1)}, 3, "x", 30)
    assert {r["i"]: r["ok"] for r in coordination.fan_in_refs(run_id, 0)} == {0: 1, 1: 1}


def test_fan_in_reopened_forgets_failures_and_publish_marks(coordination: Coordination) -> None:
    run_id = new_id()
    coordination.fan_in_open(run_id, 0, [])
    assert coordination.fan_in_add(run_id, 0, {0: ok(0), 1: failed(1)}, 2, "first", 30) is True
    coordination.fan_in_continued(run_id, 0)
    coordination.fan_in_open(run_id, 0, [{"task": "again"}])  # a resume re-expands: the failed item runs again
    assert [r["i"] for r in coordination.fan_in_refs(run_id, 0)] == [0]
    assert coordination.fan_in_add(run_id, 0, {1: ok(1)}, 2, "second", 30) is True  # and it publishes again


def test_fan_in_reopened_by_the_same_expansion_keeps_its_failures(coordination: Coordination) -> None:
    run_id = new_id()
    coordination.fan_in_open(run_id, 0, [], opener="expand-1")
    coordination.fan_in_add(run_id, 0, {1: failed(1)}, 2, "item-1", 30)
    coordination.fan_in_open(run_id, 0, [], opener="expand-1")  # the expansion redelivered after a crash
    assert [r["i"] for r in coordination.fan_in_refs(run_id, 0)] == [1]  # item 1's failure is not forgotten
    coordination.fan_in_open(run_id, 0, [], opener="resume-2")  # a resume: a new expansion, failures run again
    assert coordination.fan_in_refs(run_id, 0) == []


def test_fan_in_publish_lease_lapses(coordination: Coordination) -> None:
    run_id = new_id()
    coordination.fan_in_open(run_id, 0, [])
    assert coordination.fan_in_add(run_id, 0, {0: ok(0)}, 1, "died", 0.2) is True  # ... and never published
    assert coordination.fan_in_add(run_id, 0, {0: ok(0)}, 1, "other", 30) is False
    wait_until(lambda: coordination.fan_in_add(run_id, 0, {0: ok(0)}, 1, "other", 30), timeout=5,
               what="the dead publisher's lease to lapse")  # fmt: skip


def test_release_records_the_fan_in_in_the_same_step(coordination: Coordination) -> None:
    run_id, token = new_id(), new_id()
    coordination.fan_in_open(run_id, 1, [])
    coordination.fan_in_add(run_id, 1, {0: ok(0)}, 2, "a", 30)
    acquire(coordination, run_id, token)
    entry = FanInEntry(stage=1, item=1, ref=ok(1), total=2, token="b", lease_seconds=30)
    released = coordination.release_lock(run_id, "0:s", token, count_stage=1, fan_in=entry)
    assert released.released is True and released.stage_count == 1 and released.continue_stage is True
    assert coordination.lock_holder(run_id, "0:s") is None


# --- ledgers -------------------------------------------------------------


def test_ledger_add_contains_and_count(coordination: Coordination) -> None:
    run_id = new_id()
    assert coordination.ledger_count(run_id, "0:s", "rows") == 0
    assert coordination.ledger_contains(run_id, "0:s", "rows", ["1", "2"]) == [False, False]
    assert coordination.ledger_contains(run_id, "0:s", "rows", []) == []
    coordination.ledger_add(run_id, "0:s", "rows", "2")
    coordination.ledger_add(run_id, "0:s", "rows", "2")  # adding again changes nothing
    coordination.ledger_add(run_id, "0:s", "rows", "3")
    assert coordination.ledger_contains(run_id, "0:s", "rows", ["3", "1", "2"]) == [True, False, True]
    assert coordination.ledger_count(run_id, "0:s", "rows") == 2
    # Ledgers of another name, step or run are apart.
    assert coordination.ledger_contains(run_id, "0:s", "pages", ["2"]) == [False]
    assert coordination.ledger_contains(run_id, "1:s", "rows", ["2"]) == [False]
    assert coordination.ledger_contains(new_id(), "0:s", "rows", ["2"]) == [False]


# --- Cloud Run hand-off --------------------------------------------------


def test_handoff_round_trip_per_kind_replace_and_clear(coordination: Coordination) -> None:
    run_id = new_id()
    payload: dict[str, Any] = {"step": "s", "args": [{"ref": "0:a"}], "params": {"x": [1, 2]}, "task_id": None}
    assert coordination.get_handoff(run_id, "0:s", Handoff.PAYLOAD) is None
    coordination.put_handoff(run_id, "0:s", Handoff.PAYLOAD, payload, TTL)
    assert coordination.get_handoff(run_id, "0:s", Handoff.PAYLOAD) == payload
    assert coordination.get_handoff(run_id, "0:s", Handoff.REPORT) is None  # kinds are apart
    assert coordination.get_handoff(run_id, "1:s", Handoff.PAYLOAD) is None  # and steps
    coordination.put_handoff(run_id, "0:s", Handoff.REPORT, {"attempt": 1}, TTL)
    coordination.put_handoff(run_id, "0:s", Handoff.REPORT, {"attempt": 2}, TTL)  # replaces
    assert coordination.get_handoff(run_id, "0:s", Handoff.REPORT) == {"attempt": 2}
    coordination.clear_handoff(run_id, "0:s")
    assert coordination.get_handoff(run_id, "0:s", Handoff.PAYLOAD) is None
    assert coordination.get_handoff(run_id, "0:s", Handoff.REPORT) is None


def test_handoff_expires_after_its_ttl(coordination: Coordination) -> None:
    run_id = new_id()
    coordination.put_handoff(run_id, "0:s", Handoff.PAYLOAD, {"step": "s"}, 0.3)
    coordination.put_handoff(run_id, "0:s", Handoff.REPORT, {"attempt": 1}, TTL)
    assert coordination.get_handoff(run_id, "0:s", Handoff.PAYLOAD) == {"step": "s"}
    wait_until(lambda: coordination.get_handoff(run_id, "0:s", Handoff.PAYLOAD) is None, timeout=10, interval=0.05,
               what="the payload to expire")  # fmt: skip
    assert coordination.get_handoff(run_id, "0:s", Handoff.REPORT) == {"attempt": 1}


def test_handoff_holds_json_only(coordination: Coordination) -> None:
    with pytest.raises((TypeError, ValueError)):
        coordination.put_handoff(new_id(), "0:s", Handoff.PAYLOAD, {"value": object()}, TTL)
    with pytest.raises((TypeError, ValueError)):
        coordination.put_handoff(new_id(), "0:s", Handoff.PAYLOAD, {"value": float("nan")}, TTL)


# --- settings agreement --------------------------------------------------


def test_worker_announcements_lapse_and_are_withdrawn(coordination: Coordination) -> None:
    a, b = f"a-{new_id()}@test", f"b-{new_id()}@test"
    coordination.announce_worker(a, {"HAULAGE_STORE": "redis", "steps": ["x"]}, ttl_seconds=30)
    coordination.announce_worker(b, {"HAULAGE_STORE": "firestore"}, ttl_seconds=LIVENESS)
    seen = coordination.worker_announcements()
    assert seen[a]["HAULAGE_STORE"] == "redis" and seen[a]["steps"] == ["x"] and b in seen
    wait_until(lambda: b not in coordination.worker_announcements(), timeout=5, what="b's announcement to lapse")
    coordination.withdraw_worker(a)
    assert a not in coordination.worker_announcements()


def test_lost_run_notice_is_kept_for_its_run_only(coordination: Coordination) -> None:
    run_id = new_id()
    assert coordination.lost_run(run_id) is None
    coordination.report_lost_run(run_id, {"step": "0:s", "worker": "w"}, ttl_seconds=30)
    assert coordination.lost_run(run_id) == {"step": "0:s", "worker": "w"}
    assert coordination.lost_run(new_id()) is None


# --- completion events ---------------------------------------------------


@pytest.fixture
def feeds(coordination: Coordination) -> Iterator[Callable[[], Any]]:
    opened: list[Any] = []

    def watch() -> Any:
        opened.append(coordination.watch_completions())
        return opened[-1]

    yield watch
    for feed in opened:
        feed.close()


def test_completion_events_reach_every_subscriber(coordination: Coordination, feeds: Callable[[], Any]) -> None:
    first, second = feeds(), feeds()
    event = {"run_id": new_id(), "status": "COMPLETE", "tags": ["a"], "steps": {"total": 2, "done": 2}}
    coordination.publish_completion(event)
    assert first.get(timeout=10) == event
    assert second.get(timeout=10) == event
    started = time.monotonic()
    assert first.get(timeout=0.2) is None  # one event, heard once
    assert time.monotonic() - started >= 0.2


def test_publishing_with_no_subscriber_is_not_an_error(coordination: Coordination, feeds: Callable[[], Any]) -> None:
    coordination.publish_completion({"run_id": new_id(), "status": "FAILED"})
    later = feeds()
    assert later.get(timeout=0.2) is None  # events published before subscribing are not replayed


# --- retention -----------------------------------------------------------


def test_purge_removes_exactly_the_runs_keys(coordination: Coordination) -> None:
    run_id = new_id()
    neighbour = run_id + "x"  # an id that begins with the purged one must survive
    for rid in (run_id, neighbour):
        coordination.count_stage(rid, 1)
        coordination.ledger_add(rid, "0:s", "rows", "1")
        coordination.ledger_add(rid, "1:t[3]", "pages", "7")
    coordination.purge_run(run_id)
    assert coordination.ledger_count(run_id, "0:s", "rows") == 0
    assert coordination.ledger_count(run_id, "1:t[3]", "pages") == 0
    assert coordination.count_stage(run_id, 1) == 1  # the counter started over
    assert coordination.ledger_count(neighbour, "0:s", "rows") == 1
    assert coordination.ledger_count(neighbour, "1:t[3]", "pages") == 1
    assert coordination.count_stage(neighbour, 1) == 2
    coordination.purge_run(new_id())  # a run with nothing to purge is not an error
