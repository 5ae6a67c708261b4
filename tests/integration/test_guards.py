"""``ctx.once`` on each store, with the real step lock: what a claim left by a dead attempt means.

A dead claimant is made the way a SIGKILL leaves one: a ``pending:<token>``
claim whose token's liveness key does not exist (never beat, or lapsed). The
kills themselves, with real workers, are in tests/chaos/test_guards_under_kills.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from haulage.coordination import get_coordination
from haulage.errors import EffectOutcomeUnknown
from haulage.progress.memory_store import MemoryStore
from haulage.progress.models import RunRecord
from haulage.progress.redis_store import RedisStore
from haulage.progress.store import Store
from haulage.redis_client import get_redis
from haulage.tasks.context import StepContext
from haulage.tasks.flow import Flow
from haulage.tasks.lock import StepLock

pytestmark = pytest.mark.timeout(60)

STEP = "0:charge"
GUARD = f"{STEP}:pay"


@pytest.fixture(params=["redis", "firestore", "memory"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    request.getfixturevalue("redis_server")  # the step lock and liveness are always on Redis
    if request.param == "redis":
        yield RedisStore(get_redis())
    elif request.param == "memory":
        yield MemoryStore()
    else:
        # Imported here: google-cloud-firestore is an optional extra.
        from tests.firestore_support import firestore_store_for_tests

        yield from firestore_store_for_tests()


def attempt(store: Store, run_id: str) -> tuple[StepContext, StepLock]:
    """A step attempt as the durable wrapper makes it: the lock taken first, then the context."""
    lock = StepLock(get_coordination(), run_id, STEP, ttl_seconds=30)
    assert lock.acquire()
    flow: Flow = {"workflow": "wf", "stage": 0, "stages": 1, "item": None, "units": 1, "input": "none",
                  "on_failure": "collect", "attempt": 1}  # fmt: skip
    return StepContext(store, run_id=run_id, step_key=STEP, step_name="charge", attempt=1, flow=flow), lock


def new_run(store: Store) -> str:
    run_id = uuid.uuid4().hex
    store.create_run(RunRecord(id=run_id, workflow="wf"))
    return run_id


def unknown_events(store: Store, run_id: str) -> list[str]:
    record = store.get_run(run_id)
    assert record is not None
    return [e.message for e in record.history if e.kind == "guard-unknown" and e.step == STEP]


def test_a_claim_is_held_under_the_attempts_lock_token_and_released_when_the_block_raises(store: Store) -> None:
    run_id = new_run(store)
    ctx, lock = attempt(store, run_id)
    with pytest.raises(RuntimeError), ctx.once("pay") as first:
        assert first
        assert store.get_guards(run_id) == {GUARD: f"pending:{lock.token}"}  # alive while the lock holder is
        with ctx.once("pay") as nested:
            assert not nested  # its own claim: not a dead one
        raise RuntimeError("the provider said no")
    assert store.get_guards(run_id) == {}  # released: a retry performs it
    with ctx.once("pay") as first:
        assert first
    with ctx.once("pay") as again:
        assert not again
    assert store.get_guards(run_id) == {GUARD: "done"} and unknown_events(store, run_id) == []
    lock.release()


def test_a_dead_claimants_effect_is_redone_by_default(store: Store) -> None:
    run_id = new_run(store)
    assert store.claim_guard(run_id, GUARD, uuid.uuid4().hex) is None  # killed inside the block: no liveness
    ctx, lock = attempt(store, run_id)
    with ctx.once("pay") as first:
        assert first  # at least once: the provider deduplicates on guard_id
        assert ctx.guard_id("pay") == f"{run_id}:{GUARD}"
    assert store.get_guards(run_id) == {GUARD: "done"}
    [event] = unknown_events(store, run_id)
    assert "on_unknown='redo'" in event and ctx.guard_id("pay") in event
    lock.release()


def test_skip_gives_the_effect_up_and_says_so_once(store: Store) -> None:
    run_id = new_run(store)
    store.claim_guard(run_id, GUARD, uuid.uuid4().hex)
    ctx, lock = attempt(store, run_id)
    with ctx.once("pay", on_unknown="skip") as first:
        assert not first
    with ctx.once("pay", on_unknown="skip") as first:
        assert not first
    assert store.get_guards(run_id) == {GUARD: "unknown"}
    assert len(unknown_events(store, run_id)) == 1 and "on_unknown='skip'" in unknown_events(store, run_id)[0]
    # Redo still may take it up later (a changed step, a resume): from "unknown" too.
    with ctx.once("pay") as first:
        assert first
    assert store.get_guards(run_id) == {GUARD: "done"} and len(unknown_events(store, run_id)) == 2
    lock.release()


def test_fail_raises_effect_outcome_unknown(store: Store) -> None:
    run_id = new_run(store)
    store.claim_guard(run_id, GUARD, uuid.uuid4().hex)
    ctx, lock = attempt(store, run_id)
    with pytest.raises(EffectOutcomeUnknown, match=r"once\('pay'\) of step 0:charge .* unknown"), \
            ctx.once("pay", on_unknown="fail"):  # fmt: skip
        pytest.fail("the block must not run")
    assert store.get_guards(run_id) == {GUARD: "unknown"}
    assert "on_unknown='fail'" in unknown_events(store, run_id)[0]
    with pytest.raises(EffectOutcomeUnknown), ctx.once("pay", on_unknown="fail"):  # still unknown next time
        pass
    lock.release()


def test_a_live_claimant_keeps_its_claim(store: Store) -> None:
    """A frozen holder that woke up (its lock taken over) still performs its block: no one else does."""
    run_id = new_run(store)
    frozen = uuid.uuid4().hex
    get_coordination().refresh_liveness(frozen, 30)
    store.claim_guard(run_id, GUARD, frozen)
    ctx, lock = attempt(store, run_id)
    with ctx.once("pay") as first:
        assert not first
    assert store.get_guards(run_id) == {GUARD: f"pending:{frozen}"} and unknown_events(store, run_id) == []
    lock.release()


def test_on_unknown_is_checked(store: Store) -> None:
    ctx, lock = attempt(store, new_run(store))
    bad = "never"
    with pytest.raises(ValueError, match="on_unknown must be one of redo, skip, fail; got 'never'"), \
            ctx.once("pay", on_unknown=bad):  # type: ignore[arg-type]  # fmt: skip
        pass
    lock.release()
