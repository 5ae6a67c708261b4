"""The once-guard behind ``ctx.once(key)``: a side effect at most once per run and step.

The guard lives in the store beside the run's checkpoints, so it survives
retries, redeliveries and resumes, and is removed with the run.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from haulage.progress.store import Store

#: the value a guard holds once its block finished
DONE = "done"


@contextmanager
def once(store: Store, run_id: str, step_key: str, key: str,
         log: logging.LoggerAdapter[logging.Logger]) -> Iterator[bool]:  # fmt: skip
    """Yield True to the first attempt that claims ``key`` of this step, False to every later one.

    The guard is claimed before the effect and marked done after it; if the
    block raises, the claim is released so a retry may perform the effect. If
    the process dies inside the block, the effect's outcome is unknown and it
    is not performed again (at most once).
    """
    guard = f"{step_key}:{key}"
    token = uuid.uuid4().hex
    held = store.claim_guard(run_id, guard, token)
    first = held is None
    if held is not None and held != DONE:
        log.warning("once(%r): an earlier attempt died inside the guarded block; not repeating it", key)
    try:
        yield first
    except BaseException:
        if first:
            store.finish_guard(run_id, guard, token, done=False)
        raise
    if first:
        store.finish_guard(run_id, guard, token, done=True)


def guard_id(run_id: str, step_key: str, key: str) -> str:
    """A stable id for the effect guarded by ``once(key)``: pass it to systems that dedupe."""
    return f"{run_id}:{step_key}:{key}"
