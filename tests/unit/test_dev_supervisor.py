"""The dev stack's supervisor: a child that keeps dying is restarted with a capped backoff, and said so once."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from haulage.devtools.supervisor import KEEPS_DYING_AFTER, RESTART_BACKOFF_MAX, Child, restart_delay, tend
from tests.conftest import wait_until


def test_restart_delays_grow_exponentially_up_to_the_cap() -> None:
    delays = [restart_delay(n) for n in range(1, 10)]
    assert delays[:4] == [0.0, 1.0, 2.0, 4.0]
    assert delays == sorted(delays) and max(delays) == RESTART_BACKOFF_MAX


def test_a_child_that_keeps_dying_is_restarted_with_backoff_and_reported_once(tmp_path: Path) -> None:
    child = Child("crasher", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "crasher.log", {})
    said: list[str] = []
    starts: list[float] = []
    child.start()
    starts.append(time.monotonic())

    def look() -> bool:
        pid = child.proc.pid if child.proc else None
        tend(child, said.append, grace=20)
        if child.proc is not None and child.proc.pid != pid:
            starts.append(time.monotonic())
        return len(starts) >= KEEPS_DYING_AFTER + 1

    # Deaths 1..4 wait 0, 1, 2, 4 s before their restarts: about 7 s to the fifth start.
    wait_until(look, timeout=40, interval=0.05, what="five starts of a child that exits at once")
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[0] < 1.0 and gaps[1] >= 1.0 and gaps[2] >= 2.0 and gaps[3] >= 4.0, gaps
    restarts = [s for s in said if "exited with code 3; restarting" in s]
    assert len(restarts) == KEEPS_DYING_AFTER - 1, said
    dying = [s for s in said if "keeps dying" in s]
    assert len(dying) == 1 and "crasher.log" in dying[0], said  # once, not on every look
    assert len(said) == KEEPS_DYING_AFTER, said
    child.signal(9)
