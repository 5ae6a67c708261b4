"""Settings that the process starting a run and the workers running it must share.

A run lives where its starter wrote it (the store, the Firestore project and
collection, the key prefix) and its messages go where its starter's dispatch
mode and prefix send them. A worker that disagrees never finds the run, or never
gets its messages: the run would sit PENDING with no error anywhere. So:

- every worker's main process announces its view (:func:`view`) in Redis every
  :data:`ANNOUNCE_EVERY` seconds, valid for :data:`ANNOUNCE_TTL`;
- ``Workflow.start()`` calls :func:`check` before it writes anything, and raises
  :class:`~haulage.errors.ConfigMismatch` naming each setting that disagrees with
  the live workers that serve the same steps;
- a worker that gets a step of a run its store does not hold (a worker that did
  not announce, or one started after the check) logs it at ERROR and leaves a
  notice (:func:`report_missing_run`) that the starter's run handle turns into a
  FAILED run with the same explanation (haulage/workflows/run.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from celery import signals
from redis.exceptions import ResponseError

from haulage.coordination import get_coordination
from haulage.errors import ConfigMismatch
from haulage.settings import get_settings

log = logging.getLogger("haulage.agreement")

#: seconds between a worker's announcements
ANNOUNCE_EVERY = 5.0
#: seconds an announcement stays valid without a refresh (a killed worker drops out after this)
ANNOUNCE_TTL = 15.0
#: seconds a lost-run notice is kept for the starting process to read
LOST_NOTICE_TTL = 24 * 3600.0

# Defaults of the Firestore store (haulage/progress/firestore/store.py); repeated here because
# that package needs the optional google-cloud-firestore, and this view is taken without it.
_FIRESTORE_DEFAULTS = {
    "HAULAGE_FIRESTORE_PROJECT": "haulage-dev",
    "HAULAGE_FIRESTORE_COLLECTION": "tasks",
    "HAULAGE_FIRESTORE_DATABASE": "(default)",
    "FIRESTORE_EMULATOR_HOST": "",
}
#: settings whose disagreement is logged, not refused: a run still moves (a deployment may run
#: Cloud Run drivers for some queues and local workers for others), only perhaps not where meant
WARN_ONLY = ("HAULAGE_DISPATCH_MODE",)
_warned: set[str] = set()
#: the fix, for every message about a disagreement
_FIX = "set the same value in this process and the workers (haulage dev writes its settings to .haulage/env)"


def view() -> dict[str, str]:
    """This process's values of the settings that must agree, by environment variable name."""
    s = get_settings()
    seen = {"HAULAGE_KEY_PREFIX": s.key_prefix, "HAULAGE_STORE": s.store, "HAULAGE_DISPATCH_MODE": s.dispatch_mode}
    if s.store == "firestore":
        for name, default in _FIRESTORE_DEFAULTS.items():
            raw = os.environ.get(name, "").strip()
            if name == "HAULAGE_FIRESTORE_PROJECT":
                raw = raw or os.environ.get("GOOGLE_CLOUD_PROJECT", "").strip()
            seen[name] = raw or default
    return seen


def step_names(task_names: Iterable[str]) -> list[str]:
    """The user's step names among a Celery app's task names (Celery's and Haulage's own are everyone's)."""
    return sorted(n for n in task_names if not n.startswith(("celery.", "haulage.")))


def check(task_names: Iterable[str]) -> None:
    """Raise ConfigMismatch if the live workers serving any of these steps disagree with this process.

    A disagreement on a WARN_ONLY setting is logged once instead.

    Workers of other applications (no step in common) are not compared. A
    worker with this prefix is preferred; only when every live worker serving
    these steps has another prefix is the prefix itself the disagreement. No
    live worker at all is not an error: the run waits for one.
    """
    mine = set(step_names(task_names))
    try:
        announced = get_coordination().worker_announcements()
    except ResponseError as exc:  # e.g. a Redis ACL that allows only the prefix's keys: cannot check, do not refuse
        if "cannot-read" not in _warned:
            _warned.add("cannot-read")
            log.warning("cannot read the workers' settings to compare them (%s); starting without the check", exc)
        return
    relevant = {h: a for h, a in announced.items() if mine & set(a.get("steps", []))}
    if not relevant:
        return
    here = view()
    same_prefix = {h: a for h, a in relevant.items() if a.get("HAULAGE_KEY_PREFIX") == here["HAULAGE_KEY_PREFIX"]}
    compared = same_prefix or relevant
    differ: dict[str, dict[str, Any]] = {}
    for host, theirs in sorted(compared.items()):
        for name, value in here.items():
            if name in theirs and theirs[name] != value:
                # Firestore names are in a view only on the Firestore store, so they are compared only there.
                differ.setdefault(name, {"here": value, "workers": {}})["workers"][host] = theirs[name]
    mixed = {name: differ.pop(name) for name in WARN_ONLY if name in differ}
    if mixed and describe(mixed) not in _warned:
        _warned.add(describe(mixed))
        log.warning("%s (not refused: a fleet may mix dispatch modes by queue)", describe(mixed))
    if differ:
        raise ConfigMismatch(describe(differ), differ)


def describe(differ: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, seen in differ.items():
        workers = ", ".join(f"{h}: {v!r}" for h, v in sorted(seen["workers"].items()))
        parts.append(f"{name} is {seen['here']!r} here but {workers}")
    return "this process's settings disagree with the workers': " + "; ".join(parts) + f"; {_FIX}"


def report_missing_run(run_id: str, step_key: str) -> None:
    """A step arrived for a run this worker's store does not hold: say so loudly and tell the starter."""
    here = view()
    settings = ", ".join(f"{k}={v!r}" for k, v in here.items())
    log.error(
        "step %s of run %s arrived, but run %s is not in this worker's store; the step is not run. "
        "Most likely the process that started it uses other settings (%s here): %s",
        step_key, run_id, run_id, settings, _FIX,
    )  # fmt: skip
    try:
        get_coordination().report_lost_run(
            run_id, {"step": step_key, "worker": _hostname(), "settings": here, "at": time.time()}, LOST_NOTICE_TTL
        )
    except Exception as exc:  # the error line above already says it; the notice is a second channel
        log.error("could not leave the lost-run notice of run %s: %s", run_id, exc)


def lost_run_error(run_id: str) -> str | None:
    """The explanation a worker left for a run it could not find, compared with this process's settings."""
    notice = get_coordination().lost_run(run_id)
    if notice is None:
        return None
    theirs, here = notice.get("settings", {}), view()
    differ = {name: {"here": value, "workers": {notice.get("worker", "?"): theirs[name]}}
              for name, value in here.items() if name in theirs and theirs[name] != value}  # fmt: skip
    why = describe(differ) if differ else f"the worker's settings: {theirs}"
    return (f"run never started: worker {notice.get('worker', '?')} received its step {notice.get('step')} "
            f"but cannot find the run in its store; {why}")  # fmt: skip


_host = {"name": ""}


def _hostname() -> str:
    # A prefork child was forked before worker_ready named the worker: name the machine and process.
    return _host["name"] or f"{socket.gethostname()} pid {os.getpid()}"


class _Announcer(threading.Thread):
    """Refreshes this worker's announcement until the worker shuts down."""

    def __init__(self, hostname: str, task_names: Iterable[str]) -> None:
        super().__init__(name="haulage-agreement", daemon=True)
        self.hostname = hostname
        self.announcement: dict[str, Any] = {**view(), "steps": step_names(task_names), "pid": os.getpid()}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                get_coordination().announce_worker(self.hostname, self.announcement, ANNOUNCE_TTL)
            except Exception as exc:  # Redis away: the worker's other parts say so; try again next round
                log.warning("could not announce this worker's settings: %s", exc)
            self.stopped.wait(ANNOUNCE_EVERY)

    def stop(self) -> None:
        self.stopped.set()
        try:
            get_coordination().withdraw_worker(self.hostname)
        except Exception as exc:  # it lapses by itself after ANNOUNCE_TTL
            log.warning("could not withdraw this worker's settings: %s", exc)


_running: list[_Announcer] = []


def _on_ready(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or f"pid-{os.getpid()}"
    _host["name"] = hostname
    announcer = _Announcer(hostname, getattr(getattr(sender, "app", None), "tasks", {}).keys())
    _running.append(announcer)
    announcer.start()


def _on_shutdown(**_: Any) -> None:
    while _running:
        _running.pop().stop()


def connect_agreement() -> None:
    """Announce this process's settings while it is a worker (Celery's worker_ready to worker_shutdown)."""
    signals.worker_ready.connect(_on_ready, weak=False, dispatch_uid="haulage-agreement-ready")
    signals.worker_shutdown.connect(_on_shutdown, weak=False, dispatch_uid="haulage-agreement-shutdown")
