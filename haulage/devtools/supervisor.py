"""The dev stack's children: started in their own process groups, restarted with a capped backoff.

A child that dies is started again at once the first time, then after 1, 2,
4 ... seconds, at most RESTART_BACKOFF_MAX apart, for as long as the stack
runs: a worker that cannot start (a syntax error in the user's module, Redis
not up yet) comes back by itself once the cause is gone, and the supervisor
says it keeps dying once rather than on every look. A child that stayed up for
STABLE_AFTER seconds starts its count again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: seconds; the longest wait between two restarts of a child that keeps dying
RESTART_BACKOFF_MAX = 10.0
#: seconds a child must stay up for its next death to be restarted at once again
STABLE_AFTER = 30.0
#: deaths in a row after which the supervisor says, once, that a child keeps dying
KEEPS_DYING_AFTER = 4


def restart_delay(deaths: int) -> float:
    """Seconds to wait before restarting a child that died ``deaths`` times in a row (0 the first time)."""
    if deaths <= 1:
        return 0.0
    return float(min(RESTART_BACKOFF_MAX, 2.0 ** (deaths - 2)))


@dataclass
class Child:
    """One process of the stack: how to start it, where it logs, how to tell it is ready."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    where: str = ""
    port: int | None = None  #: ready once something listens here (None: ready once started)
    reloads: bool = False  #: restarted when the user's modules change (workers)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    deaths: int = 0  #: deaths in a row, each within STABLE_AFTER of its start
    restart_at: float | None = None  #: monotonic time of the pending restart, if one is due
    told_dying: bool = False
    reload_asked: float | None = None  #: monotonic time a reload's SIGTERM was sent
    umask: int = -1  #: the child's umask (-1: this process's); the stack keeps its own for the dev folder

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         umask=self.umask)  # fmt: skip
        self.started_at = time.monotonic()
        self.restart_at = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)


def tend(child: Child, say: Callable[[str], None], *, grace: float) -> None:
    """One look at ``child``: restart it if it died (after its backoff), finish a reload that is taking long."""
    now = time.monotonic()
    if child.alive():
        if child.reload_asked is not None and now - child.reload_asked > grace:
            child.signal(signal.SIGKILL)  # a warm shutdown that outlives the grace is not waited for
        elif child.deaths and now - child.started_at > STABLE_AFTER:
            if child.told_dying:
                say(f"  {child.name} is up again (pid {child.proc.pid if child.proc else '?'})")
            child.deaths, child.told_dying = 0, False
        return
    if child.proc is None:
        return
    if child.reload_asked is not None:
        child.reload_asked = None
        child.deaths, child.told_dying = 0, False
        child.start()
        say(f"  {child.name} reloaded (pid {child.proc.pid})")
        return
    if child.restart_at is None:
        code = child.proc.returncode
        child.deaths = child.deaths + 1 if now - child.started_at < STABLE_AFTER else 1
        delay = restart_delay(child.deaths)
        child.restart_at = now + delay
        if child.deaths < KEEPS_DYING_AFTER:
            say(f"  {child.name} exited with code {code}; restarting" + (f" in {delay:g}s" if delay else ""))
        elif not child.told_dying:
            child.told_dying = True
            say(f"  {child.name} keeps dying (exit {code}, {child.deaths} times in a row); restarting it "
                f"every {RESTART_BACKOFF_MAX:g}s at most until it stays up, see {child.log_path}")  # fmt: skip
    if now >= child.restart_at:
        child.start()
