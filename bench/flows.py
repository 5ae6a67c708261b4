"""The work both sides of the benchmark do: no-op tasks, bare and as Haulage steps."""

from __future__ import annotations

from typing import Any

from haulage.tasks import StepContext, app, step
from haulage.tasks.results import Results
from haulage.workflows import chain, fan_out, workflow

CHAIN_LENGTH = 50
FAN_OUT = 1000


@app.task(name="bench.noop")
def noop(*args: Any, **kwargs: Any) -> None:
    return None


@app.task(name="bench.count")
def count(results: list[Any]) -> int:
    """The bare chord's body: the reduce, as small as Haulage's."""
    return len(results)


@step(name="bench_noop")
def noop_step(ctx: StepContext, *args: Any, **kwargs: Any) -> None:
    return None


@step(name="bench_count")
def count_step(ctx: StepContext, results: Results) -> int:
    return len(results.successes)


@workflow("bench_chain")
def bench_chain(length: int = CHAIN_LENGTH) -> Any:
    return chain(*[noop_step.s(i=i) for i in range(length)])


@workflow("bench_fan_out")
def bench_fan_out(items: int = FAN_OUT) -> Any:
    return chain(fan_out(noop_step, [{"i": i} for i in range(items)]), count_step.s())


def _report_firestore_writes(**_: Any) -> None:
    """For bench/firestore_run.py: a pool process, on its way out, records how many run-document writes it sent."""
    import os

    from haulage.progress import get_store
    from haulage.redis_client import get_redis

    store = get_store()
    counts = getattr(store, "writes", None)
    if counts is None:
        return
    store.flush()  # type: ignore[attr-defined]
    for run_id, n in counts.items():
        get_redis().hset(f"bench:fswrites:{run_id}", str(os.getpid()), n)


if __import__("os").environ.get("HAULAGE_STORE") == "firestore":
    from celery import signals

    signals.worker_process_shutdown.connect(_report_firestore_writes, weak=False)


def _profile_pool_process(**_: Any) -> None:
    """BENCH_PROFILE=DIR: each pool process profiles everything it runs, written to DIR when it exits."""
    import atexit
    import cProfile
    import os

    profiler = cProfile.Profile()
    profiler.enable()

    def dump(**_: Any) -> None:
        profiler.disable()
        profiler.dump_stats(os.path.join(os.environ["BENCH_PROFILE"], f"worker-{os.getpid()}.prof"))

    atexit.register(dump)
    from celery import signals as _signals

    _signals.worker_process_shutdown.connect(dump, weak=False)


if __import__("os").environ.get("BENCH_PROFILE"):
    from celery import signals as _signals

    _signals.worker_process_init.connect(_profile_pool_process, weak=False)
