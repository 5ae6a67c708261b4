"""Every Redis key Haulage writes, in one place.

All keys start with the configured prefix (HAULAGE_KEY_PREFIX, default
"haulage") so several deployments can share one Redis.
"""

from __future__ import annotations

from urllib.parse import quote

from haulage.settings import get_settings


def _p() -> str:
    return get_settings().key_prefix


def runs_index() -> str:
    """Sorted set of run ids scored by creation time."""
    return f"{_p()}:runs"


def runs_index_for(*, created_by: str | None = None, workflow: str | None = None) -> str:
    """Sorted set of the run ids one creator and/or one workflow started, scored by creation time.

    Both parts are percent-encoded, so a creator named ``a:wf:b`` cannot name another index.
    """
    parts = [f"by:{quote(created_by, safe='')}"] if created_by is not None else []
    if workflow is not None:
        parts.append(f"wf:{quote(workflow, safe='')}")
    return f"{_p()}:runs:{':'.join(parts)}" if parts else runs_index()


def runs_indexed() -> str:
    """Set once runs recorded before the per-creator and per-workflow indexes existed were added to them."""
    return f"{_p()}:runs-indexed"


def runs_indexes(*, created_by: str | None, workflow: str) -> list[str]:
    """Every index a run of ``workflow`` by ``created_by`` belongs to (the global one first)."""
    out = [runs_index(), runs_index_for(workflow=workflow)]
    if created_by is not None:
        out += [runs_index_for(created_by=created_by), runs_index_for(created_by=created_by, workflow=workflow)]
    return out


def run(run_id: str) -> str:
    return f"{_p()}:run:{run_id}"


def history(run_id: str) -> str:
    return f"{_p()}:run:{run_id}:history"


def steps(run_id: str) -> str:
    return f"{_p()}:run:{run_id}:steps"


def checkpoints(run_id: str) -> str:
    return f"{_p()}:run:{run_id}:ckpt"


def guards(run_id: str) -> str:
    return f"{_p()}:run:{run_id}:guards"


def changes_channel(run_id: str) -> str:
    """Pub/sub channel that gets a message whenever the run document changes."""
    return f"{_p()}:run:{run_id}:changed"


def api_hub_channel() -> str:
    """Pub/sub channel an API process's shared subscription always listens to (nothing publishes on it)."""
    return f"{_p()}:api-hub"


def completions_channel() -> str:
    """Pub/sub channel of completion events (one JSON message per ended run)."""
    return f"{_p()}:run-completed"


def step_lock(run_id: str, step_key: str) -> str:
    return f"{_p()}:lock:{run_id}:{step_key}"


def lock_alive(token: str) -> str:
    """Liveness key of a lock holder, kept fresh by its heartbeat (see haulage/coordination/redis_coordination.py)."""
    return f"{_p()}:alive:{token}"


def held_delivery(tag: str) -> str:
    """Marks a broker delivery tag as held by a live worker (see haulage/tasks/orphans.py); expires with it."""
    return f"{_p()}:held:{tag}"


def turn(name: str) -> str:
    """Whose turn it is at a periodic job shared by all workers (e.g. the orphan sweep)."""
    return f"{_p()}:turn:{name}"


def crashes(run_id: str) -> str:
    """Hash of step key -> how many times a worker died running that step."""
    return f"{_p()}:run:{run_id}:crashes"


def worker_settings() -> str:
    """Hash of worker hostname -> the settings it must share with the processes that start runs.

    Under the default prefix whatever HAULAGE_KEY_PREFIX is, on purpose: a process whose
    prefix disagrees with the workers' must still find their announcement (see haulage/tasks/agreement.py).
    """
    return "haulage:agreement:workers"


def lost_run(run_id: str) -> str:
    """Why a worker could not find run ``run_id`` in its store (the starting process reads it)."""
    return f"{_p()}:lost:{run_id}"


def stage_progress(run_id: str) -> str:
    """Hash of finished-unit counters per plan stage, for the run's percent."""
    return f"{_p()}:run:{run_id}:stages"


def fan_in(run_id: str, stage: int, part: str) -> str:
    """A fan-out stage's fan-in (haulage/tasks/fan_in.py); ``part``: "ok"/"failed" (hashes of item index ->
    its final reference), "next" (the rest of the chain), "lease" (who publishes it), "continued"."""
    return f"{_p()}:run:{run_id}:fanin:{stage}:{part}"


def fan_in_pattern(run_id: str) -> str:
    """Glob matching every fan-in key of a run (for deletion)."""
    return f"{_p()}:run:{run_id}:fanin:*"


def ledger(run_id: str, step_key: str, name: str) -> str:
    """Set of item ids a step has processed (ctx.ledger)."""
    return f"{_p()}:run:{run_id}:ledger:{step_key}:{name}"


def ledger_pattern(run_id: str) -> str:
    """Glob matching every ledger of a run (for deletion)."""
    return f"{_p()}:run:{run_id}:ledger:*"


def handoff(run_id: str, step_key: str, kind: str) -> str:
    """A step's Cloud Run hand-off (``kind`` "payload" or "report"), see dispatch/handoff.py."""
    return f"{_p()}:dispatch:{run_id}:{step_key}:{kind}"


def run_keys(run_id: str) -> list[str]:
    """Every key that belongs to one run (for deletion)."""
    return [run(run_id), history(run_id), steps(run_id), checkpoints(run_id), guards(run_id), stage_progress(run_id)]
