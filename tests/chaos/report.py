"""The chaos suite's results table: one row per scenario, its targets asserted, printed at the session's end.

A scenario builds a :class:`Row` from what it counted outside the engine and
calls :func:`record`, which checks the targets of issue 11 (no lost item, no
duplicated or lost guarded effect, no manual resume, the run over within
``TARGET_SECONDS`` of the last fault) and appends the row to this session's
results. tests/chaos/conftest.py prints the table at the end of the session
and writes it to ``.haulage-chaos/results.md`` in the repository, for the
README's "Chaos results". Example::

    row = Row("pool children SIGKILLed", store="redis", items=200, kills=40,
              recoveries=restored, seconds_after_last_fault=18.2)
    record(row)  # raises AssertionError naming the target a scenario missed
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: seconds within which every run must end after its last fault
TARGET_SECONDS = 30.0

#: the folder the table is written to (in the repository; ignored by git)
RESULTS_DIR = Path(__file__).resolve().parents[2] / ".haulage-chaos"


@dataclass
class Row:
    """One scenario's figures. Counts come from side tables the engine does not write."""

    scenario: str
    store: str  #: "redis" or "firestore"
    items: int  #: fan-out items (or scheduled ticks, or keyed starts) the scenario expected
    kills: int  #: SIGKILLs sent (a Redis restart by SIGKILL counts as one)
    lost_items: int = 0  #: expected items with no result
    duplicated_effects: int = 0  #: a guarded effect performed again after an earlier performance was marked done
    lost_effects: int = 0  #: items that completed with their guarded effect never performed
    unknown_redos: int = 0  #: effects performed again because the claimant died inside the block (redo: allowed)
    recoveries: int = 0  #: deliveries put back by the orphan sweep, lock take-overs, reaper resumes
    seconds_after_last_fault: float = 0.0  #: from the last kill or restart to the last run's end
    manual_resumes: int = 0  #: resume calls made by the test (the target is none)
    notes: str = ""
    failures: list[str] = field(default_factory=list)  #: targets missed (filled by :func:`record`)

    def missed(self) -> list[str]:
        """The targets this row misses, each named with its value."""
        targets = ("lost_items", "duplicated_effects", "lost_effects", "manual_resumes")
        misses = [f"{name}={getattr(self, name)}" for name in targets if getattr(self, name)]
        if self.seconds_after_last_fault > TARGET_SECONDS:
            misses.append(f"seconds_after_last_fault={self.seconds_after_last_fault:.1f} > {TARGET_SECONDS:g}")
        return misses


def _results_file() -> Path:
    # One file per pytest process: helpers running parts of the suite at once do not mix their rows.
    return RESULTS_DIR / f"results-{os.getpid()}.jsonl"


def record(row: Row) -> None:
    """Append ``row`` to this session's results, then fail the calling test if it misses a target."""
    row.failures = row.missed()
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(_results_file(), "a") as out:
        out.write(json.dumps(asdict(row)) + "\n")
    print(f"\nchaos row: {json.dumps(asdict(row))}")
    assert not row.failures, f"{row.scenario} ({row.store}) missed its targets: {', '.join(row.failures)}"


def rows() -> list[Row]:
    """This session's rows, in the order they were recorded."""
    path = _results_file()
    if not path.exists():
        return []
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


HEADER = ("| scenario | store | items | kills | lost items | duplicated effects | lost effects | "
          "unknown-outcome redos | recoveries | s from last fault to end | notes |")  # fmt: skip


def table(found: list[Row]) -> str:
    """The rows as the README's markdown table, with a total line for the kills."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in found:
        mark = "" if not r.failures else " (MISSED: " + ", ".join(r.failures) + ")"
        lines.append(f"| {r.scenario}{mark} | {r.store} | {r.items} | {r.kills} | {r.lost_items} | "
                     f"{r.duplicated_effects} | {r.lost_effects} | {r.unknown_redos} | {r.recoveries} | "
                     f"{r.seconds_after_last_fault:.1f} | {r.notes} |")  # fmt: skip
    slowest = max(r.seconds_after_last_fault for r in found)
    lines.append(f"| **total** | | {sum(r.items for r in found)} | {sum(r.kills for r in found)} | "
                 f"{sum(r.lost_items for r in found)} | {sum(r.duplicated_effects for r in found)} | "
                 f"{sum(r.lost_effects for r in found)} | {sum(r.unknown_redos for r in found)} | "
                 f"{sum(r.recoveries for r in found)} | max {slowest:.1f} | |")  # fmt: skip
    return "\n".join(lines)


def write_table() -> Path | None:
    """Write this session's table to ``.haulage-chaos/results.md``; None when no scenario recorded a row."""
    found = rows()
    if not found:
        return None
    path = RESULTS_DIR / "results.md"
    path.write_text(table(found) + "\n")
    _results_file().unlink(missing_ok=True)
    return path
